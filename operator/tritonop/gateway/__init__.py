"""The OpenAI-compatible gateway in front of Triton: one admission bound per model.

``app`` builds the ASGI application, ``protocol`` validates OpenAI request bodies (pure),
``admission`` bounds requests per model, ``backend`` talks to Triton over gRPC, and
``server`` runs it all under uvicorn.
"""

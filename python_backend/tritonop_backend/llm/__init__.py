"""Text generation with continuous batching, free of Triton so that it can be tested alone.

:mod:`.params` validates requests against the resource's policy, :mod:`.sampling`
chooses tokens, :mod:`.text` turns them into safe pieces of text, :mod:`.kv` holds
the shared cache, :mod:`.engine` batches sequences continuously and :mod:`.loading`
loads a model (and turns a GGUF file into one, once).
"""

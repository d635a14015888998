"""tritonop: serve embedding search and LLMs on NVIDIA Triton, on Kubernetes or one machine."""

__version__ = "0.1.0"

API_GROUP = "serving.tritonop.dev"
API_VERSION = "v1alpha1"

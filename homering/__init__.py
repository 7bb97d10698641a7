"""homering: large GGUF language models on a home cluster.

Layer windows of one model run on several devices (llama.cpp through
llama-cpp-python); the devices coordinate over MQTT and pass hidden states
around a TCP ring. The design follows PRIMA.CPP (Li et al., arXiv 2504.08791).
"""

__version__ = "0.1.0"

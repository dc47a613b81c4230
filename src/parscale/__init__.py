"""parscale: parallel scaling of language models.

ParScale (Chen et al., "Parallel Scaling Law for Language Models", arXiv 2505.10475) runs P
copies ("streams") of the input through one set of weights, each stream with its own learned
key/value prefix, and mixes the P final hidden states with learned per-token weights.
"""

from .config import ParScaleConfig
from .errors import ParScaleError

__version__ = "0.1.0"

__all__ = ["ParScaleConfig", "ParScaleError", "ParScaleForCausalLM", "Tokenizer", "__version__"]


def __getattr__(name):  # lazy: `import parscale` stays cheap for CLI subcommands without torch
    if name == "ParScaleForCausalLM":
        from .model import ParScaleForCausalLM

        return ParScaleForCausalLM
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(name)

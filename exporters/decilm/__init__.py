"""The two code files a nemotron-nas (DeciLM form) checkpoint carries: per-layer FFN widths, removed attention.

vLLM serves such a checkpoint with its own ``DeciLMForCausalLM`` but reads the config through
``trust_remote_code``; transformers loads it through these files with ``trust_remote_code=True``.
Stock ``LlamaForCausalLM`` cannot load it (different FFN widths, or layers without attention).
"""

from pathlib import Path

CODE_FILES = (Path(__file__).parent / "configuration_decilm.py", Path(__file__).parent / "modeling_decilm.py")
AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}

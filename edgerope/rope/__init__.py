"""The rope contract (numpy only): rope scaling math and the HF config forms, and the function
llama.cpp computes from GGUF keys.

The names a user picks a scaling by are defined here, once, without importing numpy (the CLI's ``--help``
stays instant).
"""

# Scalings a user asks for by name (``set-rope --type``, ``finetune --rope``, the extension experiment):
# "none" is plain rope, "ntk" the static NTK-aware base change (docs/llama_cpp.md §4.6).
SCALING_CHOICES = ("none", "linear", "yarn", "ntk")
# The ones that extend a context (what ``finetune --rope`` trains for).
EXTENDING_CHOICES = ("yarn", "linear", "ntk")
# ``finetune --rope``: an extending scaling, or "keep": train at the checkpoint's own rope as its config.json
# declares it (any type the PyTorch model computes: LongRoPE, llama3, YaRN, ...), scaled again by nothing.
KEEP = "keep"
FINETUNE_CHOICES = (*EXTENDING_CHOICES, KEEP)

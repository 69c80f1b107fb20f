"""Hugging Face transformers interop: each model family's "hf" adapter (named in its registry
entry) maps its weights to a transformers family exactly, or refuses in one line; `export_hf`
writes a folder `AutoModelFor*.from_pretrained` loads with no custom code, `import_hf` turns a
local transformers folder (GPT-2, Phi, Starcoder2, Arcee, T5) into an amtrain export folder.
transformers is imported only when used (extra `hf`). See docs/hf.md.
"""

from amtrain.hf.folder import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]

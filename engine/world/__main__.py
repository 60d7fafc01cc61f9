"""``python -m engine.world``: make sure the tiny world is in the cache (the model is
copied from the package's shipped build) and print the sha256 of every file, so two
machines can compare their worlds bit for bit; ``--rebuild`` regenerates the data and
pretrains the model here and says whether it came out identical to the shipped build."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

from engine import world
from engine.world.cache import (
    differs_from_shipped,
    file_hashes,
    shipped_dir,
    shipped_problem,
    write_shipped,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.world", description=__doc__)
    parser.add_argument("--rebuild", action="store_true",
                        help="regenerate the data and retrain tokenizer and model on this machine "
                             "even if cached (minutes), instead of copying the shipped build")
    parser.add_argument("--data-only", action="store_true", help="build only the data files")
    parser.add_argument("--eval", action="store_true",
                        help="print the base model's perplexity on each language's test.txt")
    parser.add_argument("--shipped", action="store_true",
                        help="check the build the package ships against its manifest and print "
                             "its hashes (nothing is built; exit status 1 when it is missing or damaged)")
    parser.add_argument("--write-shipped", action="store_true",
                        help="maintainers: rebuild, then make this build the one the package ships "
                             "(engine/world/shipped-models/); see docs/world.md")
    args = parser.parse_args(argv)
    if args.shipped:
        return _check_shipped()
    if args.write_shipped and args.data_only:
        parser.error("--write-shipped builds the model; it cannot go with --data-only")

    started = time.perf_counter()
    rebuild = args.rebuild or args.write_shipped
    folders = {"data": world.data_dir(rebuild=rebuild)}
    if not args.data_only:
        for name in world.BUILTIN_MODELS:
            folders[f"models/{name}"] = world.model_path(name, rebuild=rebuild)
    print(f"# tiny world v{world.WORLD_VERSION} at {world.world_dir()} "
          f"({time.perf_counter() - started:.1f} s)")
    for label, folder in folders.items():
        for rel, digest in file_hashes(folder).items():
            print(f"{digest}  {label}/{rel}")
    if args.write_shipped:
        for name in world.BUILTIN_MODELS:
            target = write_shipped(name, folders[f"models/{name}"], _build_record(name))
            print(f"# models/{name}: written to {target} as the build the package ships")
    else:
        for name in world.BUILTIN_MODELS if not args.data_only else ():
            print(f"# models/{name}: {_compared(name, folders[f'models/{name}'])}")
    if args.eval and not args.data_only:
        _print_perplexities()
    return 0


def _compared(name: str, folder: Path) -> str:
    """One line: whether the cached model is the shipped build."""
    differing = differs_from_shipped(name, folder)
    if differing is None:
        return "this installation ships no build to compare with"
    if not differing:
        return "identical to the build the package ships"
    return (f"differs from the build the package ships in {', '.join(differing)} (pretrained "
            f"on this machine; another CPU, torch version or thread count gives other bits, see "
            f"docs/world.md); delete {folder} to use the shipped build")


def _check_shipped() -> int:
    status = 0
    for name in world.BUILTIN_MODELS:
        problem = shipped_problem(name)
        if problem:
            print(f"# models/{name}: {problem}")
            status = 1
            continue
        folder = shipped_dir(name)
        print(f"# models/{name}: shipped at {folder}, matches its manifest")
        for rel, digest in file_hashes(folder).items():
            print(f"{digest}  models/{name}/{rel}")
    return status


def _build_record(name: str) -> dict[str, object]:
    """What the shipped build was made from and where (``<name>.build.json``): the
    settings, the digest of the rows the pretraining consumed, the machine."""
    import tokenizers
    import torch
    import transformers

    # imported here for start-up speed: only --write-shipped needs the pretraining module (torch)
    from engine.world import pretrain

    _, rows = pretrain.pretraining_data(pretrain.PRETRAIN_STEPS * pretrain.BATCH_SIZE, pretrain.SEED)
    return {
        "model": name, "world_version": world.WORLD_VERSION,
        "steps": pretrain.PRETRAIN_STEPS, "batch_size": pretrain.BATCH_SIZE,
        "seq_len": pretrain.SEQ_LEN, "peak_lr": pretrain.PEAK_LR, "seed": pretrain.SEED,
        "pretraining_rows_sha256": pretrain.rows_digest(rows),
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "transformers_version": transformers.__version__, "tokenizers_version": tokenizers.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpu": _cpu_name(),
        "built": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _print_perplexities() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # imported here for start-up speed: only --eval needs the pretraining module (torch)
    from engine.world.pretrain import perplexity

    folder = world.model_path("tiny-base")
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for lang in world.LANGUAGES:
        lines = world.data_path(f"{lang}/test.txt").read_text(encoding="utf-8").splitlines()
        print(f"# perplexity tiny-base {lang}/test.txt: {perplexity(model, tokenizer, lines):.2f}")


if __name__ == "__main__":
    sys.exit(main())

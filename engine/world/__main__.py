"""``python -m engine.world``: build (or ``--rebuild``) the tiny world and print the
sha256 of every file, so two machines can compare their builds bit for bit."""

from __future__ import annotations

import argparse
import sys
import time

from engine import world
from engine.world.cache import file_hashes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.world", description=__doc__)
    parser.add_argument("--rebuild", action="store_true",
                        help="regenerate the data and retrain tokenizer and model even if cached")
    parser.add_argument("--data-only", action="store_true", help="build only the data files")
    parser.add_argument("--eval", action="store_true",
                        help="print the base model's perplexity on each language's test.txt")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    folders = {"data": world.data_dir(rebuild=args.rebuild)}
    if not args.data_only:
        for name in world.BUILTIN_MODELS:
            folders[f"models/{name}"] = world.model_path(name, rebuild=args.rebuild)
    print(f"# tiny world v{world.WORLD_VERSION} at {world.world_dir()} "
          f"({time.perf_counter() - started:.1f} s)")
    for label, folder in folders.items():
        for rel, digest in file_hashes(folder).items():
            print(f"{digest}  {label}/{rel}")
    if args.eval and not args.data_only:
        _print_perplexities()
    return 0


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

"""Regenerate the relumon pictures shown in the docs, from the ReLU story's runs.

python scripts/docs_figures.py --out docs/img
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def main(argv: list[str] | None = None) -> None:
    import relu_story

    from relumon.figures import grad_flow_figure

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs") / "img")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = relu_story.main(["--logdir", str(Path(tempfile.mkdtemp()) / "relu_story")])
    pictures = {
        "grad_flow_sigmoid.png": (results["vanishing"]["Sigmoid"], "10 sigmoid layers: the gradient vanishes"),
        "grad_flow_relu.png": (results["vanishing"]["ReLU"], "the same MLP with ReLU"),
        "grad_flow_dying_relu.png": (results["dying"]["ReLU"], "ReLU at lr 1.0: the last layer died"),
        "grad_flow_dying_leaky.png": (results["dying"]["LeakyReLU"], "LeakyReLU at lr 1.0: gradients still flow"),
        "grad_flow_plain.png": (results["skip"]["plain"], "20 plain blocks"),
        "grad_flow_residual.png": (results["skip"]["residual"], "20 residual blocks, x + f(x)"),
    }
    for name, (report, title) in pictures.items():
        grad_flow_figure(report, title=title).savefig(args.out / name)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()

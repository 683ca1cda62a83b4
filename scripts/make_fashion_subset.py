"""Write the Fashion-MNIST subset that ships in the package (lbgen/data/fashion_mnist/), from Debian's files.

    python scripts/make_fashion_subset.py [--data /usr/share/datasets/fashion-mnist] [--per-class 100]

`make-downstream --kind fashion-mnist` reads it where Debian's `dataset-fashion-mnist` is not installed.
Seeded (seed 0) and byte-stable (gzip without a timestamp): rerunning it rewrites the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lbgen.data.fashion_mnist import DEBIAN_DIR, SHIPPED_DIR, SPLITS, load_split, per_class_sample, write_idx


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEBIAN_DIR)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--out", default=str(SHIPPED_DIR))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, prefix in SPLITS.items():
        images, labels = load_split(split, Path(args.data))
        keep = per_class_sample(labels, args.per_class, seed=0)
        write_idx(out / f"{prefix}-images-idx3-ubyte.gz", images[keep])
        write_idx(out / f"{prefix}-labels-idx1-ubyte.gz", labels[keep].astype("uint8"))
        print(f"{split}: {len(keep)} images -> {out}")


if __name__ == "__main__":
    main()

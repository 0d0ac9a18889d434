"""Toy .npy files for the README's CLI tour, written to the current folder.

    python examples/tour_files.py        # then run the tour in this folder

keys.npy (2000, 128) and med_keys.npy (500, 128): clustered unit float32
rows; values.npy / med_values.npy (n, 128) float32; queries.npy (16, 128);
scores.npy (2000,) in [0, 1): e.g. how much attention each memory drew.
"""
from __future__ import annotations

import numpy as np


def unit_rows(rng: np.random.Generator, centers: np.ndarray, n: int) -> np.ndarray:
    x = centers[rng.integers(0, len(centers), n)] + 0.3 * rng.standard_normal((n, 128))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def main() -> None:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((32, 128))
    files = {"keys": unit_rows(rng, centers, 2000),
             "values": rng.standard_normal((2000, 128), dtype=np.float32),
             "med_keys": unit_rows(rng, centers, 500),
             "med_values": rng.standard_normal((500, 128), dtype=np.float32),
             "queries": unit_rows(rng, centers, 16),
             "scores": rng.random(2000, dtype=np.float32)}
    for name, a in files.items():
        np.save(f"{name}.npy", a)
        print(f"wrote {name}.npy {a.shape} {a.dtype}")


if __name__ == "__main__":
    main()

"""The run's configuration: the full design (experiment-design.md section 4) and --tiny."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from experiments.memory_lm.model import ModelConfig


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: int = 8
    seed: int = 0
    # data
    corpus_budget: int | None = None        # bytes per corpus (None: all files)
    eval_bytes: int = 65536                 # final eval set per corpus (256-byte windows)
    curve_stride: int = 4                   # the curve along the steps scores every 4th window (16 KB)
    eval_batch: int = 16
    # phase P
    p_steps: int = 800                      # the design's fallback (1000 planned): the 2-core budget
    p_lr: float = 2e-3
    p_warmup: int = 50
    p_wd: float = 0.1
    p_table_lr: float = 1e-3
    # fine-tune arms
    ft_steps: int = 200
    ft_evals: tuple[int, ...] = (0, 25, 50, 100, 150, 200)
    lr_dense: float = 3e-4
    lr_dense_table: float = 3e-4
    lr_lora: float = 1e-3
    lora_r: int = 8
    lora_alpha: float = 16.0
    lr_domain: float = 1e-2
    domain_slots: int = 128 ** 2
    domain_seed: int = 1
    domain_index: str = "HNSW32|efSearch=32"  # the data-key bank (Flat: ~10x the search time)
    kmeans_queries: int = 65_536
    kmeans_iters: int = 8
    arms: tuple[str, ...] = ("dense", "lora", "domain_random", "domain_data")
    # phase S
    s_steps: int = 300
    s_lr: float = 1e-3
    s_fifo_rows: int = 16_384
    s_min_file: int = 16_384
    # session eval
    docs: int = 8                           # 12 planned: the 64 KB prefix pass and 64k-row searches dominate
    prefix: int = 65_536
    span: int = 8_192
    mems: tuple[int, ...] = (0, 256, 1024, 8192, 65_536)
    n_boot: int = 2000
    tiny: bool = False

    def scaled(self, scale: float) -> "RunConfig":
        """Step counts times scale (at least 1; eval points scaled with them)."""
        def s(n: int) -> int:
            return max(1, round(n * scale))
        ft = s(self.ft_steps)
        evals = tuple(sorted({min(ft, round(e * scale)) for e in self.ft_evals} | {0, ft}))
        return replace(self, p_steps=s(self.p_steps), p_warmup=max(1, round(self.p_warmup * scale)),
                       ft_steps=ft, ft_evals=evals, s_steps=s(self.s_steps))

    def to_dict(self) -> dict:
        d = asdict(self)
        return d


def full() -> RunConfig:
    return RunConfig()


def tiny() -> RunConfig:
    m = ModelConfig(T=32, d=32, L=1, heads=2, know_layer=0, know_heads=2, know_dk=16, know_dv=16,
                    know_topk=4, base_slots=8 ** 2, epi_layer=0, epi_heads=2, epi_dk=16,
                    epi_dv=16, epi_topk=4)
    return RunConfig(model=m, batch=4, corpus_budget=200_000, eval_bytes=1024, eval_batch=16,
                     p_steps=5, p_warmup=1, ft_steps=3, ft_evals=(0, 1, 3), domain_slots=4 ** 2,
                     kmeans_queries=512, kmeans_iters=3, s_steps=3, s_fifo_rows=256,
                     s_min_file=2048, docs=2, prefix=1536, span=512, mems=(0, 32, 128),
                     n_boot=200, tiny=True)

"""What the step-overhead benchmark times: schedules, methods and the hyperparameters every configuration shares."""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES: tuple[tuple[int, int], ...] = ((1, 10), (10, 100))
QUICK_SCHEDULES: tuple[tuple[int, int], ...] = ((1, 2), (2, 4))
METHODS: tuple[str, ...] = ("sgd", "eigen", "inverse")
KAISA_METHODS: tuple[str, ...] = ("kaisa-eigen", "kaisa-inverse")
BATCH = 32
SGD_KWARGS: dict[str, float] = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
KFAC_KWARGS: dict[str, float] = {"damping": 1e-3, "factor_decay": 0.95, "kl_clip": 1e-3}
# KAISA / kfac-pytorch, eigen method, ResNet-18, same 2-core machine class (context shown when --kaisa is not given).
KAISA_REFERENCE: dict[tuple[int, int], float] = {(10, 100): 9.2, (1, 10): 23.0}


@dataclass
class Config:
    """One timed configuration: a schedule and an optimizer method."""

    factor_update_steps: int
    inv_update_steps: int
    method: str

    @property
    def schedule(self) -> str:
        return f"({self.factor_update_steps},{self.inv_update_steps})"

    @property
    def key(self) -> str:
        return f"{self.schedule} {self.method}"


TRUNCATE: dict[str, float] = {}
"""``{"truncate": ε}`` for the ``eigen-truncated`` configurations (added beside ``eigen`` by ``--truncate``)."""


def make_configs(schedules: tuple[tuple[int, int], ...], *, kaisa: bool = False) -> list[Config]:
    configs = []
    for fus, ius in schedules:
        if ius % fus:
            raise ValueError(f"inv_update_steps={ius} must be a multiple of factor_update_steps={fus}")
        configs += [Config(fus, ius, m) for m in METHODS + (("eigen-truncated",) if TRUNCATE else ())
                    + (KAISA_METHODS if kaisa else ())]
    return configs



"""The bundled benchmarks: each is one module that registers itself when imported.

A new bundled benchmark is one module calling
:func:`taskbalance.bench.api.register_benchmark` and one entry in :data:`BUNDLED_MODULES`
(the order is the order of ``taskbalance list``).
"""

import importlib

BUNDLED_MODULES = (
    "taskbalance.bench.multidigits",
    "taskbalance.bench.digits_mixed",
    "taskbalance.bench.gradnorm_toy",
    "taskbalance.bench.noisy_regression",
    "taskbalance.bench.scenes",
    "taskbalance.bench.real_datasets",
    "taskbalance.bench.celeba",
)

for _module in BUNDLED_MODULES:
    importlib.import_module(_module)

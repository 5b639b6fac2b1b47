"""dpa_core: the ML of Decoupled Proxy Alignment (model assembly, losses, data, stages).

Imports no orchestration: the pipelines (DVC, Prefect, MLflow) call into this package.
"""

__version__ = "0.1.0"

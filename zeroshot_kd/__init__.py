"""zkd (``zeroshot_kd``): data-free image synthesis, low-bit quantization and KD for PyTorch classifiers."""

from .version import __version__  # noqa: E402

from .errors import ZkdError  # noqa: E402
from .spec import InputSpec  # noqa: E402
from .teachers import Teacher, load_teacher  # noqa: E402

__all__ = ["InputSpec", "Teacher", "ZkdError", "__version__", "load_teacher"]
from .shards import ShardDataset  # noqa: E402
from .synthesis import synthesize  # noqa: E402

__all__ += ["ShardDataset", "synthesize"]
from .quant.student import load_student  # noqa: E402

__all__ += ["load_student"]
from .export import export_onnx  # noqa: E402

__all__ += ["export_onnx"]

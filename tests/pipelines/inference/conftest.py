# One torch thread for the tiny test models, as in the DPO tests.
from tests.pipelines.sp_dpo_curriculum.conftest import one_torch_thread  # noqa: F401

"""Jobs in one long-lived process (ComfyUI) may use different precisions: accelerate's process-wide state must
not make the second one fail."""

from accelerate.state import AcceleratorState

from dit_distillery.trainer.job import TrainJob
from dit_distillery.trainer.setup import make_accelerator as _accelerator


def test_second_job_with_other_precision_gets_its_own():
    try:
        first = _accelerator(TrainJob(mixed_precision="bf16"))
        assert first.mixed_precision == "bf16"
        second = _accelerator(TrainJob(mixed_precision="no"))  # accelerate alone raises "already initialized"
        assert second.mixed_precision == "no"
        again = _accelerator(TrainJob(mixed_precision="no"))  # same settings: the shared state is reused
        assert again.mixed_precision == "no"
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)

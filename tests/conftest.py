"""Fixtures shared by test modules."""
import pytest

from rmix.pipelines.synth import synth_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """4 classes x 6 train / 3 val JPEGs of 24 px: 3 steps per epoch at batch 8 (test_ddp has its own)."""
    return synth_dataset(tmp_path_factory.mktemp("d") / "tiny", classes=4, train_per_class=6, val_per_class=3,
                         width=24, height=24)

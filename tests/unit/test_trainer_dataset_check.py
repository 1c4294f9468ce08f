"""`streamrec train --dataset` refuses a dataset the feature repo was not set up for.

The towers read attributes through Feast: training a log whose ids collide with another dataset's
while the repo still holds that dataset would give those ids the other dataset's attributes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from features.profiles import DatasetStamp, write_stamp
from features.settings import FeatureStoreTuning
from online_trainer.cli import load_training_dataset
from online_trainer.settings import TrainerSettings
from streamrec.core.attributes import AttributeSchema
from streamrec.core.errors import SettingsError

LOG = "user,item,ts\n1,1,1700000000\n2,1,1700000001\n1,3,1700000002\n"
COLUMNS = "user=user,item=item,timestamp=ts,rating="


def settings(data_dir: Path) -> TrainerSettings:
    return TrainerSettings(features=FeatureStoreTuning(data_dir=data_dir))


def test_a_repo_set_up_for_another_dataset_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "my_log.csv"
    log.write_text(LOG)
    data_dir = tmp_path / "feast"
    data_dir.mkdir()
    with pytest.raises(SettingsError, match="holds nothing"):
        load_training_dataset(str(log), COLUMNS, settings(data_dir))
    # Same (empty) attribute schema and kinds, another dataset: still refused, by name.
    write_stamp(data_dir, DatasetStamp("other_log", AttributeSchema(event_kinds=("view",))))
    with pytest.raises(SettingsError, match="holds dataset 'other_log'.*features setup --dataset"):
        load_training_dataset(str(log), COLUMNS, settings(data_dir))
    write_stamp(data_dir, DatasetStamp("my_log", AttributeSchema(event_kinds=("view",))))
    dataset = load_training_dataset(str(log), COLUMNS, settings(data_dir))
    assert dataset.item_ids == ["1", "3"]

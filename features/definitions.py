"""The module ``feast -c features apply`` scans: every Feast object of streamrec, module-level.

The objects come from ``features.views.build`` for the data dir of the configured settings
(``STREAMREC_*`` environment, like every process) and the attribute schema stored there, so the
CLI registers the same paths and views that ``streamrec features setup`` does. Without a schema
(a clean checkout) there are only the stream views; a profile view the schema does not declare is
None here, which the scan skips. Importing this module also creates the data dir with its
push-log seeds (``features.push_log.ensure_layout``): the CLI creates the registry right after
the scan and, on a clean checkout, its folder (``.state/feast/``) would not exist yet.

``.feastignore`` keeps the CLI away from every other module of this package. Python code
should not import this module; it uses ``features.store`` (``apply``) instead.
"""

from __future__ import annotations

from features import push_log, views
from features.settings import FeaturesSettings
from streamrec.core.attributes import read_schema
from streamrec.core.settings import load

_settings = load(FeaturesSettings)
_schema = read_schema(_settings.data_dir)
push_log.ensure_layout(_settings.data_dir, _schema)
_definitions = views.build(_settings.data_dir, _schema)

user = _definitions.user
item = _definitions.item
user_activity_push = _definitions.user_activity_push
item_stats_push = _definitions.item_stats_push
user_profile = _definitions.user_profile
item_profile = _definitions.item_profile
user_activity = _definitions.user_activity
item_stats = _definitions.item_stats
recommender_user_v1 = _definitions.recommender_user
recommender_item_v1 = _definitions.recommender_item

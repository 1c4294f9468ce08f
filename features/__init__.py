"""The Feast feature repository of streamrec and the helpers every component reaches it with.

For other components (names and shapes are in ``streamrec.core.contracts``):

* settings: subclass ``features.settings.FeaturesSettings`` (Redis, data dir, registry, project,
  ``max_feature_age_s``) and build it with ``streamrec.core.settings.load``;
* ``features.store.open_store(settings)``: a ``feast.FeatureStore`` configured from settings;
* views follow the dataset's attribute schema (``streamrec.core.attributes``, stored in the data
  dir by set-up): ``features.views.user_activity_view(schema)`` / ``item_stats_view(schema)`` are
  the stream views' columns (per-kind counts when the dataset has several kinds);
* writing: the Faust worker writes rows with ``features.push.RowWriter`` (one per view, online
  and to the push log); frames go through ``features.push.push`` (``push_user_activity``,
  ``push_item_stats``); last write wins by event time (see ``features.push``);
* reading: ``features.store.read_online(store, service_name, ids, include_event_timestamps=True)``;
  the API's hot path reads through ``features.feast_internals`` (see there);
* training: ``features.history.historical_features(store, entity_df, USER_FEATURE_SERVICE)``,
  point-in-time correct, one output row per input row;
* set-up: ``streamrec features setup --dataset PRESET|PATH`` (``features.cli``), in code
  ``features.store.setup(settings, spec)`` or ``setup_dataset(store, name, schema, users, items)``;
  switching datasets clears the previous one's rows. ``feast -c features apply`` registers the
  views of the schema set-up stored.

Modules: ``settings`` (typed config), ``views`` (every Feast object, built for a data dir and a
schema), ``definitions`` (what the Feast CLI scans), ``profiles`` (attribute rows to parquet, and
which dataset the store holds), ``store`` (open, set up, read), ``push`` and
``push_log`` (stream rows to Redis and to the offline log), ``history`` (training reads),
``feast_internals`` (the only module that uses Feast's private API), ``watch`` (a few users'
activity rows for the demo), ``cli`` (``streamrec features ...``), ``errors``.
"""

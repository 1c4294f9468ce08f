"""The gRPC recommendation API (``streamrec.v1.Recommender``).

Modules, one job each:

* ``proto``       builds the generated gRPC code from ``serving/proto`` on first use
* ``settings``    ``ApiSettings`` (the ``api`` section on top of serving and feature settings)
* ``validation``  request checks that answer INVALID_ARGUMENT
* ``arms``        stable/canary assignment by hashing the user id with the experiment salt
* ``user_features`` one user's row of the ``recommender_user_v1`` FeatureService, with age checks
* ``trending``    the in-memory trending list (item_stats), refreshed in the background
* ``ranking``     asks the model server, or falls back to trending, within the model budget
* ``interleave``  team-draft interleaving of the canary's and stable's lists
* ``impressions`` logs every response to Kafka from a background thread
* ``metrics``     Prometheus metrics
* ``errors``      the API's error hierarchy
* ``service``     the Recommend handler; ``server`` the grpcio server; ``cli`` ``streamrec api serve``
"""

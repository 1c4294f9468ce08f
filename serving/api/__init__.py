"""The gRPC recommendation API (``streamrec.v1.Recommender``).

Modules, one job each:

* ``proto``       builds the generated gRPC code from ``serving/proto`` on first use
* ``settings``    ``ApiSettings`` (the ``api`` section on top of serving and feature settings)
* ``validation``  request checks that answer INVALID_ARGUMENT
* ``arms``        stable/canary assignment by hashing the user id with the experiment salt
* ``user_features`` one user's row of the ``recommender_user_v1`` FeatureService, with age checks,
                  as the model inputs of the dataset's attribute schema
* ``trending``    the in-memory trending list (item_stats), refreshed in the background
* ``ranking``     asks the model server (catalog or allow-list), or falls back to trending, within
                  the model budget
* ``similar``     an item's neighbours from the model's ``similar`` signature, or trending
* ``interleave``  team-draft interleaving of the canary's and stable's lists
* ``impressions`` logs every response to Kafka from a background thread
* ``metrics``     Prometheus metrics
* ``errors``      the API's error hierarchy
* ``service``     the Recommend and SimilarItems handlers; ``server`` the grpcio server; ``cli`` ``streamrec api serve``
"""

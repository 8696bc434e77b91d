"""Training and registry seeding: the shipped models trained, evaluated, logged and registered.

It sits above the model classes (``deployments``) and the batch pipelines (``batch``) and uses
both; the serving core (``servecore``) imports nothing from here."""

"""Progressive delivery: a candidate version earns its traffic step by step on live evidence, or
is rolled back the moment a gate fails (README, "Progressive delivery").

* :mod:`.model` — the plan, the evidence, the gates and the state machine (plain data);
* :mod:`.stats` — the tests behind the gates;
* :mod:`.store` — rollouts, evidence, recorded answers and feedback in the job store's database;
* :mod:`.control` — start, steer, and keep the registry in step (aliases, decision tags);
* :mod:`.agent` — what each gateway replica runs: evidence, the split, the leader's judgement;
* ``python -m servecore.rollouts`` — the command line.
"""

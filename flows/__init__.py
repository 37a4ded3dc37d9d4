"""Prefect flows over the DVC pipeline: tasks run `dvc repro <stage>`; DVC decides what is stale.

mining (prepare, mine), training (train), encoding (encode_zeroshot, encode, index_zeroshot,
index), evaluation (evaluate), and pipeline (the four in order, as subflows). deploy.py serves
them on the cron schedules of schedules.yaml.
"""

"""Offline jobs: rerank a whole benchmark (`m0lite eval`) or a table of pairs (`m0lite batch`).

data.py reads and writes the files (BEIR folders, TREC runs, pair tables),
runner.py turns a job into chunks and scores them resumably in this process,
ray_job.py scores the same chunks on a Ray cluster, metrics.py asks ir-measures
for the numbers, cli.py wires the two subcommands.
"""

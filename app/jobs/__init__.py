"""Producer side of the job queue: job records, the job service, queue dispatch."""

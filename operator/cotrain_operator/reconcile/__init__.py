"""Pure reconcile logic: (job, observed pods, GPU nodes, now) -> the objects and status wanted.

`placement` fits pod groups on nodes per sharing mode, `children` builds the objects a job owns,
`status` does the condition and patch arithmetic, and `job.decide` puts them together. Nothing
here talks to the API: `controller.py` feeds it observations and `k8s.py` carries out decisions.
"""

"""A command-line client for the worker: ``python -m client PROMPT [options]`` submits a job to a
RunPod endpoint (``--endpoint ID``, with ``RUNPOD_API_KEY``) or to the SDK's local API
(``--url http://localhost:8000``), follows its stream with a progress bar per stage, saves the
images, and exits non-zero with the job's error when it fails. Needs only requests and tqdm
(client/requirements.txt)."""

"""The Gradio app (DESIGN section 7): `mmdeploy serve RUN`.

`service` (decode, predict, time; no web framework), `examples` (example images from the
run's test split), `ui` (the Gradio page), `server` (FastAPI + `/health` + uvicorn, clean
shutdown on SIGINT/SIGTERM).
"""

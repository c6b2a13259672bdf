"""The batch-inference stage: `mmdeploy infer RUN INPUTS -o ROWS`.

`inputs` lists what to read (folders, globs, manifests), `batch` decodes, predicts and
writes rows on this machine, `writers` appends and resumes the rows file, `ray_engine` and
`ray_cluster` run the same steps on Ray Data (`--engine ray`; Ray Serve reuses the cluster
helpers), `demo_images` writes a folder of real image files to try it on.
"""

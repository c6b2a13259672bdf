"""The Gradio app (see DESIGN section 7); `mmdeploy serve` lands with the serving issue."""

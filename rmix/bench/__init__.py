"""`rmix bench`: each benchmark measures the new path beside its baseline in one run, as ratios.

data (input pipelines), mix (the fused op), train (the step), soak (memory over thousands of
steps), contention (runs sharing the CPU); timing holds what they share.
"""

"""The front ends: the `femtogpt` command (cli.py, each command's errors
turned into one line and an exit status by guard.py), sampling (sample.py),
the browser playground (serve.py, web/) and its view inside a model
(probe.py).

May import anything below it: training, files, the model, text.
"""

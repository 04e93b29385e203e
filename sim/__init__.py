"""SimPy backend: predicts how a scenario would run on devices and links that need not exist.

Devices, links and the draft node become timed SimPy resources whose service times come from
measured profiles (`profiles/`); a synthetic drafter/target pair calibrated from acceptance profiles,
or an exact replay of a recorded runtime trace, supplies the acceptance outcomes. The shared
scheduling core in `flowspec/` makes every decision; this package only turns its commands into
simulated time. It never imports `runtime`.
"""

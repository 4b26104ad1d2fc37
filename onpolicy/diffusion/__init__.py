"""The diffusion math as pure functions: schedules, forward (corruption) processes, losses."""

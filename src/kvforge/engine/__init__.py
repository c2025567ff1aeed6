"""The serving loop: requests, scheduler, runner, sampler, engine."""

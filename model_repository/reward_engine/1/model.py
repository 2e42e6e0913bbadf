"""Triton adapter: token ids -> raw reward outputs, via reward_server.pipeline.scheduler (the engine's
own queue: admission, waves, dropped work) over reward_server.pipeline.stages.score_requests.

`execute` hands the requests over and returns None; each is answered through its response sender
when its wave ends (or at once, when it is dropped or refused).
"""

try:  # written by `reward-server serve`: the stub runs Python isolated, ignoring PYTHONPATH
    import reward_server_paths  # noqa: F401
except ImportError:  # a tritonserver whose own Python has the packages installed
    pass

from reward_server.pipeline import settings, stages
from reward_server.pipeline.scheduler import EngineScheduler, Job
from reward_server.pipeline.torch_engine import kernels
from reward_server.pipeline.triton_io import (DropMetrics, EngineMetrics, KernelInfo, QueueMetrics, answer_later,
                                              input_array, ticket_of)


class TritonPythonModel:
    def initialize(self, args):
        params = settings.parameters_of(args)
        self.metrics = EngineMetrics(args["model_name"])
        self.drops = DropMetrics(args["model_name"])
        self.queue_metrics = QueueMetrics(args["model_name"])
        self.drain = settings.drain_from_parameters(params)
        limits = settings.queue_limits_from_parameters(params)
        self.scheduler = EngineScheduler(
            lambda inputs, alive: stages.score_requests(self.engine, inputs, alive), None,
            limits, settings.board_from_parameters(params),
            progress=lambda: self.engine.tokens_done(), on_drop=self.drops.drop,
            on_wave=self._after_wave, on_rate=settings.load_publisher_from_parameters(params, limits),
            on_queue=self.queue_metrics.queued)
        # loaded on the scheduler's thread, which computes every wave (see EngineScheduler.start)
        self.engine = self.scheduler.start(setup=lambda: settings.engine_from_parameters(params))
        self.scheduler.token_budget = self.engine.token_budget
        self.kernel_info = KernelInfo(args["model_name"], kernels.info(self.engine.kernel),
                                      kernels.describe(self.engine.kernel))
        self.cache_metrics = (None if self.engine.cache is None else
                              EngineMetrics(args["model_name"], EngineMetrics.PREFIX_CACHE_FIELDS, "prefix_cache_",
                                            EngineMetrics.PREFIX_CACHE_GAUGES))

    def execute(self, requests):
        # a request the engine fails never reaches postprocessing: the drain counts it finished here
        finished = None if self.drain is None else (lambda: self.drain.finished(1))
        # copies: the inputs outlive `execute`, which the stub's tensors are not promised to
        self.scheduler.submit([Job((input_array(r, "input_ids").copy(), input_array(r, "input_lengths").copy()),
                                   ticket_of(r), answer_later(r, finished)) for r in requests])
        return None

    def _after_wave(self, jobs, start, seconds):
        self.metrics.update(self.engine.stats)
        if self.cache_metrics is not None:
            self.cache_metrics.update(self.engine.cache.stats)
        self.queue_metrics.wave(jobs, start, seconds)

    def finalize(self):
        self.scheduler.stop()

"""On-paper floor of one recursion step on a Jetson module's GPU: an estimate for a report written away from it.

floor = FLOPs of one puzzle-step (matmuls, counted from the model's shapes: ModelConfig.step_flops) / the module
GPU's dense peak in the graph's precision. It is a floor, not a prediction: every matmul at the tensor cores' peak,
no softmax, norms, memory traffic or launch overhead (small batches on a GPU reach far less). It ranks the variants
of one model on one module as the device would only roughly, and it is labelled as an estimate wherever it shows;
`trm-export report` on the device measures.

Module throughput: SMs x GPU max clock x dense operations per SM per clock. Ampere (sm_87, Orin): 4096 INT8, 2048
FP16, 1024 TF32 (TensorRT builds float32 layers with TF32 by default). Volta (sm_72, Xavier): 2048 INT8, 1024 FP16,
no TF32: float32 runs on the CUDA cores, 64 per SM (128 operations per clock). These reproduce NVIDIA's published
module figures (dense INT8: Orin Nano 8 GB 20.5 TOPS, Orin NX 16 GB 30.1, AGX Orin 64 GB 85.2; AGX Xavier 22.6).
The DLA cores are left out: TensorRT's DLA does not run attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from trm_export.targets.registry import Target


@dataclass(frozen=True)
class JetsonGpu:
    name: str
    target: str  # the module's trm-export target
    sms: int
    clock_ghz: float  # GPU max clock
    per_sm_clock: tuple[int, int, int]  # dense operations per SM per clock: INT8, FP16, FP32 (TF32 where there is one)

    def peak(self, precision: str) -> float:
        """Dense operations per second in `precision` (int8 and mixed: INT8; fp16; fp32: TF32 / CUDA cores)."""
        int8, fp16, fp32 = self.per_sm_clock
        per = int8 if precision in ("int8", "mixed") else fp16 if precision == "fp16" else fp32
        return self.sms * self.clock_ghz * 1e9 * per


_AMPERE, _VOLTA = (4096, 2048, 1024), (2048, 1024, 128)
GPUS = (
    JetsonGpu("Orin Nano 4 GB", "jetson-orin-nano", 4, 0.625, _AMPERE),
    JetsonGpu("Orin Nano 8 GB", "jetson-orin-nano", 8, 0.625, _AMPERE),
    JetsonGpu("Orin Nano 8 GB super (JetPack 6.1+)", "jetson-orin-nano", 8, 1.020, _AMPERE),
    JetsonGpu("Orin NX 8 GB", "jetson-orin-nx", 6, 0.765, _AMPERE),
    JetsonGpu("Orin NX 16 GB", "jetson-orin-nx", 8, 0.918, _AMPERE),
    JetsonGpu("AGX Orin 32 GB", "jetson-agx-orin", 14, 0.939, _AMPERE),
    JetsonGpu("AGX Orin 64 GB", "jetson-agx-orin", 16, 1.300, _AMPERE),
    JetsonGpu("Xavier NX", "jetson-xavier-nx", 6, 1.100, _VOLTA),
    JetsonGpu("AGX Xavier", "jetson-agx-xavier", 8, 1.377, _VOLTA),
)


def gpus_for(target: Target) -> list[JetsonGpu]:
    """The GPUs a target's engines may land on: its module's (every memory size), or every module of an any-Jetson
    target; none for a target that is not a Jetson (a desktop GPU's figures are not this table's)."""
    names = set(target.modules) if target.decided_on_device else {target.name.replace("-jp7", "")}
    return [gpu for gpu in GPUS if gpu.target in names]


def floor_us(step_flops: int, steps: float, precision: str, gpu: JetsonGpu) -> float:
    """On-paper floor, in microseconds, of `steps` recursion steps of one puzzle on `gpu`."""
    return step_flops * steps / gpu.peak(precision) * 1e6

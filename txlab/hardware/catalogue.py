"""The named hardware profiles: vendors' data-sheet figures of the devices txlab predicts time for.

Every figure is the data sheet's (dense, i.e. half the "with sparsity" figure where only that is given) unless
its comment says it is an assumption. Units here are the data sheets': TFLOP/s, GB (10^9 bytes), GB/s one
direction per device. `link_gbps` is the intra-node link one device has to its peers (NVLink, Infinity Fabric,
or PCIe where there is none); `network_gbps` the inter-node bandwidth per device (its share of the node's
NICs). `match` names the words of `torch.cuda.get_device_properties(...).name` that identify the part, so a
measured row's MFU reads its peak from here (txlab.measure.throughput): variants first, as "NVIDIA H100 PCIe"
is not the SXM part, nor "NVIDIA L40" an L4 or an L40S.

fp32 is the non-tensor-core rate (txlab does not enable TF32) except where the data sheet lists a matrix-core
FP32 rate the library uses for fp32 GEMMs (MI300X). The efficiencies the time model applies to these peaks
are calibrated separately (txlab.hardware.efficiency, docs/time_model.md).
"""

from __future__ import annotations

from typing import Any

# name -> the profile's fields (txlab.hardware.profile.FIELDS), `match` and `source`.
CATALOGUE: dict[str, dict[str, Any]] = {
    # NVIDIA H200 NVL product brief (2024): 835 TFLOPS BF16 dense (1,671 sparse), FP32 60 TFLOPS, 141 GB HBM3e,
    # 4.8 TB/s, NVLink bridge 900 GB/s (2- or 4-way); PCIe cards: 4 per NVLink domain assumed as nodes of 4.
    "h200-nvl": dict(
        device_name="NVIDIA H200 NVL", match=("H200", "NVL"), peak_tflops={"bf16": 835.5, "fp32": 60.0},
        memory_gb=141, memory_bandwidth_gbps=4800, link_gbps=450, devices_per_node=4, network_gbps=50,
        source="NVIDIA H200 NVL product brief; network 400 Gb/s per GPU assumed",
    ),
    # NVIDIA H200 Tensor Core GPU data sheet (SXM): 989 TFLOPS BF16 dense (1,979 sparse), FP32 67 TFLOPS, 141 GB
    # HBM3e at 4.8 TB/s, NVLink 900 GB/s (450 each way); HGX H200: 8 GPUs, one 400 Gb/s NIC per GPU (50 GB/s).
    "h200": dict(
        device_name="NVIDIA H200", match=("H200",), peak_tflops={"bf16": 989.4, "fp32": 66.9},
        memory_gb=141, memory_bandwidth_gbps=4800, link_gbps=450, devices_per_node=8, network_gbps=50,
        source="NVIDIA H200 Tensor Core GPU data sheet; HGX H200 with ConnectX-7 400 Gb/s per GPU",
    ),
    # NVIDIA H100 data sheet, PCIe form factor: 756 TFLOPS BF16 dense (1,513 sparse), FP32 51 TFLOPS, 80 GB HBM2e
    # at 2.0 TB/s, PCIe Gen5 128 GB/s (64 each way) between cards; network: 200 Gb/s per GPU assumed.
    "h100-pcie": dict(
        device_name="NVIDIA H100 PCIe", match=("H100", "PCIe"), peak_tflops={"bf16": 756.5, "fp32": 51.2},
        memory_gb=80, memory_bandwidth_gbps=2000, link_gbps=64, devices_per_node=8, network_gbps=25,
        source="NVIDIA H100 Tensor Core GPU data sheet (PCIe); network 200 Gb/s per GPU assumed",
    ),
    # NVIDIA H100 data sheet, NVL: 835 TFLOPS BF16 dense, FP32 60 TFLOPS, 94 GB HBM3 at 3.9 TB/s, NVLink bridge
    # 600 GB/s between pairs (nodes of 2 here); network 400 Gb/s per GPU assumed.
    "h100-nvl": dict(
        device_name="NVIDIA H100 NVL", match=("H100", "NVL"), peak_tflops={"bf16": 835.5, "fp32": 60.0},
        memory_gb=94, memory_bandwidth_gbps=3900, link_gbps=300, devices_per_node=2, network_gbps=50,
        source="NVIDIA H100 Tensor Core GPU data sheet (NVL); network 400 Gb/s per GPU assumed",
    ),
    # NVIDIA H100 data sheet, SXM5: 989 TFLOPS BF16 dense (1,979 sparse), FP32 67 TFLOPS, 80 GB HBM3 at 3.35 TB/s,
    # NVLink 900 GB/s (450 each way); DGX H100 data sheet: 8 GPUs, 8 x ConnectX-7 400 Gb/s (50 GB/s per GPU).
    "h100-sxm": dict(
        device_name="NVIDIA H100 80GB HBM3", match=("H100",), peak_tflops={"bf16": 989.4, "fp32": 66.9},
        memory_gb=80, memory_bandwidth_gbps=3350, link_gbps=450, devices_per_node=8, network_gbps=50,
        source="NVIDIA H100 Tensor Core GPU data sheet (SXM5); NVIDIA DGX H100 data sheet",
    ),
    # NVIDIA HGX B200 (1,000 W) as NVIDIA lists it: 2,250 TFLOPS BF16 dense (4,500 sparse), FP32 80 TFLOPS, 180 GB
    # HBM3e per GPU (1,440 GB per 8) at 8 TB/s, NVLink 5 1.8 TB/s (900 each way); DGX B200: 8 x 400 Gb/s NICs.
    "b200": dict(
        device_name="NVIDIA B200", match=("B200",), peak_tflops={"bf16": 2250.0, "fp32": 80.0},
        memory_gb=180, memory_bandwidth_gbps=8000, link_gbps=900, devices_per_node=8, network_gbps=50,
        source="NVIDIA HGX B200 / DGX B200 data sheets",
    ),
    # NVIDIA A100 data sheet, SXM4 80 GB: 312 TFLOPS BF16 dense (624 sparse), FP32 19.5 TFLOPS, HBM2e 2,039 GB/s,
    # NVLink 600 GB/s (300 each way); DGX A100 data sheet: 8 GPUs, 8 x ConnectX-6 HDR 200 Gb/s (25 GB/s per GPU).
    "a100-80g": dict(
        device_name="NVIDIA A100-SXM4-80GB", match=("A100",), peak_tflops={"bf16": 312.0, "fp32": 19.5},
        memory_gb=80, memory_bandwidth_gbps=2039, link_gbps=300, devices_per_node=8, network_gbps=25,
        source="NVIDIA A100 Tensor Core GPU data sheet (SXM4 80GB); NVIDIA DGX A100 data sheet",
    ),
    # AMD Instinct MI300X data sheet: 1,307.4 TFLOPS BF16 dense (2,614.9 sparse), FP32 matrix 163.4 TFLOPS, 192 GB
    # HBM3 at 5.3 TB/s, 7 Infinity Fabric links of 64 GB/s each way (448 GB/s to its 7 peers); platform: 8 GPUs,
    # one 400 Gb/s NIC per GPU assumed.
    "mi300x": dict(
        device_name="AMD Instinct MI300X", match=("MI300X",), peak_tflops={"bf16": 1307.4, "fp32": 163.4},
        memory_gb=192, memory_bandwidth_gbps=5300, link_gbps=448, devices_per_node=8, network_gbps=50,
        source="AMD Instinct MI300X data sheet; network 400 Gb/s per GPU assumed",
    ),
    # NVIDIA L40S data sheet: 362 TFLOPS BF16 dense (733 sparse), FP32 91.6 TFLOPS, 48 GB GDDR6 at 864 GB/s, PCIe
    # Gen4 x16 64 GB/s (32 each way), no NVLink; 8 per server and 100 Gb/s per GPU assumed.
    "l40s": dict(
        device_name="NVIDIA L40S", match=("L40S",), peak_tflops={"bf16": 362.05, "fp32": 91.6},
        memory_gb=48, memory_bandwidth_gbps=864, link_gbps=32, devices_per_node=8, network_gbps=12.5,
        source="NVIDIA L40S data sheet; 8 per server and network 100 Gb/s per GPU assumed",
    ),
    # NVIDIA L40 data sheet: 181 TFLOPS BF16 dense (362 sparse), FP32 90.5 TFLOPS, 48 GB GDDR6 at 864 GB/s.
    "l40": dict(
        device_name="NVIDIA L40", match=("L40",), peak_tflops={"bf16": 181.05, "fp32": 90.5},
        memory_gb=48, memory_bandwidth_gbps=864, link_gbps=32, devices_per_node=8, network_gbps=12.5,
        source="NVIDIA L40 data sheet; 8 per server and network 100 Gb/s per GPU assumed",
    ),
    # NVIDIA A10G (AWS G5): 70 TFLOPS BF16 dense, FP32 31.2 TFLOPS, 24 GB GDDR6 at 600 GB/s, PCIe Gen4; g5.48xlarge:
    # 8 GPUs, 100 Gb/s for the instance (1.56 GB/s per GPU).
    "a10g": dict(
        device_name="NVIDIA A10G", match=("A10G",), peak_tflops={"bf16": 70.0, "fp32": 31.2},
        memory_gb=24, memory_bandwidth_gbps=600, link_gbps=32, devices_per_node=8, network_gbps=1.56,
        source="NVIDIA A10 data sheet figures as AWS lists the A10G; AWS G5 instance page",
    ),
    # NVIDIA L4 data sheet: 121 TFLOPS BF16 dense (242 sparse), FP32 30.3 TFLOPS, 24 GB GDDR6 at 300 GB/s, PCIe Gen4
    # x16 64 GB/s (32 each way); 8 per server (as Google's g2-standard-96) and 100 Gb/s for 8 assumed.
    "l4": dict(
        device_name="NVIDIA L4", match=("L4",), peak_tflops={"bf16": 121.0, "fp32": 30.3},
        memory_gb=24, memory_bandwidth_gbps=300, link_gbps=32, devices_per_node=8, network_gbps=1.56,
        source="NVIDIA L4 data sheet; 8 per server and network 100 Gb/s per 8 GPUs assumed",
    ),
}  # fmt: skip

# The names the docs and the issue list first; the catalogue holds a few more parts (for MFU by device name).
MAIN_NAMES = ("a100-80g", "h100-sxm", "h100-pcie", "h200", "b200", "mi300x", "l40s", "l4")

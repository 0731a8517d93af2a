//! The libtorch device the trainer will use, resolved from `torch.device`, and the facts about
//! the linked libtorch that `/v1/status` reports.

use serde::Serialize;
use tch::Device;

/// Resolve `torch.device` ("auto", "cpu", "cuda", "cuda:N"); sets libtorch's CPU thread count.
pub fn resolve(device: &str, threads: i32) -> Result<Device, String> {
    tch::set_num_threads(threads);
    match device {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "cuda:0" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        d => match d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if (n as i64) < tch::Cuda::device_count() => Ok(Device::Cuda(n)),
            _ => Err(format!(
                "torch.device = {d:?}, but libtorch sees {} CUDA device(s)",
                tch::Cuda::device_count()
            )),
        },
    }
}

/// What libtorch offers on this machine.
#[derive(Debug, Clone, Serialize)]
pub struct TorchInfo {
    pub device: String,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    pub threads: i32,
}

pub fn info(device: Device) -> TorchInfo {
    TorchInfo {
        device: format!("{device:?}"),
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: tch::Cuda::device_count(),
        threads: tch::get_num_threads(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_always_resolves_and_libtorch_computes() {
        assert_eq!(resolve("cpu", 1), Ok(Device::Cpu));
        let auto = resolve("auto", 1).unwrap();
        assert_eq!(auto == Device::Cpu, !tch::Cuda::is_available());
        // The linked libtorch really runs: a 2x2 product on the chosen device.
        let a = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
            .reshape([2, 2])
            .to_device(auto);
        let b = a.matmul(&a).to_device(Device::Cpu);
        assert_eq!(
            Vec::<f32>::try_from(b.reshape([-1])).unwrap(),
            vec![7.0, 10.0, 15.0, 22.0]
        );
        assert!(resolve("cuda:99", 1).is_err());
    }
}

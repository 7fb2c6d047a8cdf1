//! The real source: NVML through `nvml-wrapper`.
//!
//! Per-GPU failures do not fail the reading: a GPU that NVML cannot read is reported
//! `Unhealthy` with NVML's answer as the reason, because a node whose one broken GPU hides the
//! other seven would be worse for placement than a node that says which GPU is broken.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    time::Duration,
};

use nvml_wrapper::{
    enum_wrappers::{
        device::{EccCounter, MemoryError, TemperatureSensor},
        nv_link::IntDeviceType,
    },
    error::NvmlError,
    Device, Nvml,
};

use crate::api::{GpuDevice, GpuHealth};

use super::{
    source::{InventorySource, NodeReading, SourceKind},
    InventoryError,
};

/// The library the driver installs. The unversioned `libnvidia-ml.so` that `Nvml::init` looks
/// for comes only with development packages, so it is tried second.
const NVML_LIBRARY: &str = "libnvidia-ml.so.1";

/// NVLink links per GPU that NVML can describe (`NVML_NVLINK_MAX_LINKS` in nvml.h).
const MAX_NVLINK_LINKS: u32 = 18;

/// Xid codes caused by applications (bad kernels, page faults, preemption), not by hardware.
/// The NVIDIA device plugin skips the same ones; they must not take a GPU out of service.
const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Reads the node's GPUs through NVML.
pub struct NvmlSource {
    /// NVML stays initialised for the life of the process; leaking the handle gives the Xid
    /// event set the `'static` borrow it needs without a self-referential struct.
    nvml: &'static Nvml,
    #[cfg(target_os = "linux")]
    xid_events: Option<nvml_wrapper::EventSet<'static>>,
    /// Last critical Xid per GPU uuid. Such errors need a GPU reset, so they stay until the
    /// agent restarts (as the device plugin also does).
    xid_errors: BTreeMap<String, u64>,
}

impl std::fmt::Debug for NvmlSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlSource")
            .field("xid_errors", &self.xid_errors)
            .finish_non_exhaustive()
    }
}

impl NvmlSource {
    /// Initialises NVML. Fails with [`InventoryError::NvmlUnavailable`] on a node without the
    /// driver or the library.
    pub fn open() -> Result<Self, InventoryError> {
        let nvml = match Nvml::builder().lib_path(OsStr::new(NVML_LIBRARY)).init() {
            Ok(nvml) => nvml,
            Err(first) => Nvml::init().map_err(|_| InventoryError::NvmlUnavailable {
                reason: describe_init_error(&first),
            })?,
        };
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        Ok(Self {
            nvml,
            #[cfg(target_os = "linux")]
            xid_events: register_xid_events(nvml),
            xid_errors: BTreeMap::new(),
        })
    }

    #[cfg(target_os = "linux")]
    fn drain_xid_events(&mut self) {
        let Some(set) = &self.xid_events else { return };
        // Bounded: a storm of events is drained over several samples.
        for _ in 0..1024 {
            match set.wait(0) {
                Ok(event) => {
                    let Some(nvml_wrapper::enums::event::XidError::Value(xid)) = event.event_data
                    else {
                        continue;
                    };
                    if APPLICATION_XIDS.contains(&xid) {
                        tracing::debug!(xid, "application Xid, GPU stays healthy");
                        continue;
                    }
                    if let Ok(uuid) = event.device.uuid() {
                        tracing::warn!(xid, %uuid, "critical Xid error");
                        self.xid_errors.insert(uuid, xid);
                    }
                }
                Err(NvmlError::Timeout) => break,
                Err(error) => {
                    tracing::warn!(%error, "reading NVML events failed");
                    break;
                }
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn drain_xid_events(&mut self) {}
}

#[cfg(target_os = "linux")]
fn register_xid_events(nvml: &'static Nvml) -> Option<nvml_wrapper::EventSet<'static>> {
    use nvml_wrapper::bitmasks::event::EventTypes;
    let count = nvml.device_count().ok()?;
    let mut set = nvml.create_event_set().ok()?;
    for index in 0..count {
        let Ok(device) = nvml.device_by_index(index) else {
            continue;
        };
        // Registering an unsupported type frees the set, so ask first.
        let supported = device
            .supported_event_types()
            .is_ok_and(|t| t.contains(EventTypes::CRITICAL_XID_ERROR));
        if !supported {
            tracing::info!(index, "GPU does not report Xid events");
            continue;
        }
        set = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(set) => set,
            Err(error) => {
                tracing::warn!(index, error = %error.error, "cannot watch Xid events");
                return None;
            }
        };
    }
    Some(set)
}

impl InventorySource for NvmlSource {
    fn read(&mut self, _elapsed: Duration) -> Result<NodeReading, InventoryError> {
        self.drain_xid_events();
        let nvml = self.nvml;
        let count = nvml.device_count().map_err(|source| InventoryError::Nvml {
            call: "nvmlDeviceGetCount",
            source,
        })?;
        let devices: Vec<(u32, Result<Device<'_>, NvmlError>)> =
            (0..count).map(|i| (i, nvml.device_by_index(i))).collect();
        let by_bus: BTreeMap<(u32, u32, u32), u32> = devices
            .iter()
            .filter_map(|(i, d)| {
                let pci = d.as_ref().ok()?.pci_info().ok()?;
                Some(((pci.domain, pci.bus, pci.device), *i))
            })
            .collect();
        let mut switched = BTreeSet::new();
        let mut gpus: Vec<GpuDevice> = devices
            .iter()
            .map(|(index, device)| match device {
                Err(error) => unreadable(*index, error),
                Ok(d) => match self.read_gpu(*index, d, &by_bus) {
                    Ok((gpu, via_switch)) => {
                        if via_switch {
                            switched.insert(*index);
                        }
                        gpu
                    }
                    Err(error) => unreadable(*index, &error),
                },
            })
            .collect();
        // GPUs on an NVSwitch fabric reach every other GPU on it.
        for gpu in &mut gpus {
            if switched.contains(&gpu.index) {
                let mut peers: BTreeSet<u32> = gpu.nvlink_peers.iter().copied().collect();
                peers.extend(switched.iter().copied().filter(|&p| p != gpu.index));
                gpu.nvlink_peers = peers.into_iter().collect();
            }
        }
        Ok(NodeReading {
            gpus,
            driver_version: nvml.sys_driver_version().ok(),
            cuda_version: nvml.sys_cuda_driver_version().ok().map(|v| {
                format!(
                    "{}.{}",
                    nvml_wrapper::cuda_driver_version_major(v),
                    nvml_wrapper::cuda_driver_version_minor(v)
                )
            }),
        })
    }

    fn kind(&self) -> SourceKind {
        SourceKind::Nvml
    }
}

impl NvmlSource {
    /// One GPU, and whether it has NVLink links to an NVSwitch.
    fn read_gpu(
        &self,
        index: u32,
        d: &Device<'_>,
        by_bus: &BTreeMap<(u32, u32, u32), u32>,
    ) -> Result<(GpuDevice, bool), NvmlError> {
        let uuid = d.uuid()?;
        let memory = d.memory_info()?;
        let mut problems: Vec<(GpuHealth, String)> = Vec::new();
        if let Some(xid) = self.xid_errors.get(&uuid) {
            problems.push((
                GpuHealth::Unhealthy,
                format!("critical Xid {xid}; the GPU needs a reset"),
            ));
        }
        match d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile) {
            Ok(n) if n > 0 => problems.push((
                GpuHealth::Unhealthy,
                format!("{n} uncorrectable ECC errors since the driver loaded"),
            )),
            Err(NvmlError::GpuLost) => return Err(NvmlError::GpuLost),
            _ => {}
        }
        if d.are_pages_pending_retired().unwrap_or(false) {
            problems.push((
                GpuHealth::Degraded,
                "memory pages are pending retirement; reset the GPU".into(),
            ));
        }
        let health = problems
            .iter()
            .map(|(h, _)| *h)
            .max_by_key(|h| match h {
                GpuHealth::Healthy => 0,
                GpuHealth::Degraded => 1,
                GpuHealth::Unhealthy => 2,
            })
            .unwrap_or(GpuHealth::Healthy);
        let reason = (!problems.is_empty()).then(|| {
            problems
                .iter()
                .map(|(_, r)| r.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        });

        let mut peers = BTreeSet::new();
        let mut via_switch = false;
        for link in 0..MAX_NVLINK_LINKS {
            let wrapper = d.link_wrapper_for(link);
            if !wrapper.is_active().unwrap_or(false) {
                continue;
            }
            let Ok(remote) = wrapper.remote_pci_info() else {
                continue;
            };
            match by_bus.get(&(remote.domain, remote.bus, remote.device)) {
                Some(&peer) if peer != index => {
                    peers.insert(peer);
                }
                Some(_) => {}
                // Not a GPU of this node: an NVSwitch, unless NVML says it is something else.
                None => {
                    via_switch |= matches!(
                        wrapper.remote_device_type(link),
                        Ok(IntDeviceType::Switch) | Err(_)
                    );
                }
            }
        }

        let gpu = GpuDevice {
            index,
            uuid,
            product: d.name()?,
            memory_total_mib: memory.total / MIB,
            memory_free_mib: memory.free / MIB,
            utilization_percent: d.utilization_rates().map(|u| u.gpu.min(100)).unwrap_or(0),
            temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
            power_watts: d.power_usage().ok().map(|mw| (mw + 500) / 1000),
            health,
            health_reason: reason,
            nvlink_peers: peers.into_iter().collect(),
            mig_enabled: d.mig_mode().is_ok_and(|m| m.current == 1),
        };
        Ok((gpu, via_switch))
    }
}

const MIB: u64 = 1024 * 1024;

/// A GPU NVML lists but cannot read.
fn unreadable(index: u32, error: &NvmlError) -> GpuDevice {
    let reason = match error {
        NvmlError::GpuLost => "the GPU has fallen off the bus (NVML: GPU lost)".to_owned(),
        other => format!("NVML cannot read the GPU: {other}"),
    };
    GpuDevice {
        index,
        uuid: format!("unknown-{index}"),
        product: "unknown".into(),
        health: GpuHealth::Unhealthy,
        health_reason: Some(reason),
        ..GpuDevice::default()
    }
}

/// NVML's initialisation error on one line, in the words a node administrator uses.
fn describe_init_error(error: &NvmlError) -> String {
    let text = match error {
        NvmlError::LibloadingError(e) => {
            let msg = e.to_string();
            if msg.contains("cannot open shared object") || msg.contains("No such file") {
                format!("{NVML_LIBRARY} not found")
            } else {
                format!("cannot load {NVML_LIBRARY}: {msg}")
            }
        }
        NvmlError::LibraryNotFound => format!("{NVML_LIBRARY} not found"),
        NvmlError::DriverNotLoaded => "the NVIDIA kernel driver is not loaded".to_owned(),
        NvmlError::NoPermission => "no permission to talk to the NVIDIA driver".to_owned(),
        other => other.to_string(),
    };
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_errors_read_as_one_line() {
        assert_eq!(
            describe_init_error(&NvmlError::DriverNotLoaded),
            "the NVIDIA kernel driver is not loaded"
        );
        assert_eq!(
            describe_init_error(&NvmlError::LibraryNotFound),
            "libnvidia-ml.so.1 not found"
        );
        let multi = NvmlError::FailedToLoadSymbol("a\nb".into());
        assert!(!describe_init_error(&multi).contains('\n'));
    }

    #[test]
    fn unreadable_gpus_are_unhealthy_with_the_reason() {
        let g = unreadable(3, &NvmlError::GpuLost);
        assert_eq!(g.health, GpuHealth::Unhealthy);
        assert!(g.health_reason.unwrap().contains("fallen off the bus"));
        assert_eq!(g.index, 3);
    }
}

//! The cgroups the jailed VMM joins, as Firecracker's jailer makes them: for cgroup v1, one
//! directory `<controller mount>/<parent>/<id>` per controller a `--cgroup` file names; for v2,
//! one directory `<unified mount>/<parent>/<id>` with the controllers enabled down to it.

use crate::{sys, Error};
use std::path::{Path, PathBuf};

/// One `--cgroup FILE=VALUE`.
struct Setting {
    controller: String,
    file: String,
    value: String,
}

fn parse(s: &str) -> Result<Setting, Error> {
    let bad = |why: &str| Error::Invalid(format!("cgroup setting '{s}': {why}"));
    let (file, value) = s.split_once('=').ok_or_else(|| bad("not FILE=VALUE"))?;
    let controller = file
        .split_once('.')
        .map(|(c, _)| c)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| bad("the file is not CONTROLLER.NAME"))?;
    if file.contains('/') || file.contains("..") || value.is_empty() {
        return Err(bad("a file name and a value are needed"));
    }
    Ok(Setting {
        controller: controller.to_owned(),
        file: file.to_owned(),
        value: value.to_owned(),
    })
}

/// (filesystem type, mount point, options) of every cgroup mount.
fn mounts() -> Result<Vec<(String, PathBuf, String)>, Error> {
    let text = std::fs::read_to_string("/proc/mounts").map_err(sys("read /proc/mounts"))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && f[2].starts_with("cgroup"))
                .then(|| (f[2].to_owned(), PathBuf::from(f[1]), f[3].to_owned()))
        })
        .collect())
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    std::fs::write(path, value).map_err(sys(format!("write '{value}' to {}", path.display())))
}

/// Makes `<base>/<parent>/<id>` (refusing an existing one) and returns it.
fn make_dir(base: &Path, parent: &str, id: &str) -> Result<PathBuf, Error> {
    let parent_dir = base.join(parent.trim_matches('/'));
    std::fs::create_dir_all(&parent_dir)
        .map_err(sys(format!("create cgroup {}", parent_dir.display())))?;
    let dir = parent_dir.join(id);
    std::fs::create_dir(&dir).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Invalid(format!("cgroup {} already exists", dir.display()))
        } else {
            sys(format!("create cgroup {}", dir.display()))(e)
        }
    })?;
    Ok(dir)
}

/// cpuset v1 refuses tasks until cpus and mems are set: each new level copies its parent's.
fn inherit_cpuset(mount: &Path, dir: &Path) -> Result<(), Error> {
    let levels: Vec<&Path> = dir.ancestors().take_while(|p| *p != mount).collect();
    for level in levels.into_iter().rev() {
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let here = level.join(file);
            let current = std::fs::read_to_string(&here).unwrap_or_default();
            if current.trim().is_empty() {
                let from = level.parent().unwrap_or(mount).join(file);
                let v = std::fs::read_to_string(&from)
                    .map_err(sys(format!("read {}", from.display())))?;
                write(&here, v.trim())?;
            }
        }
    }
    Ok(())
}

/// Puts process `pid` into the cgroups `settings` ask for (nothing when there are none).
pub(crate) fn join(
    version: &str,
    settings: &[String],
    parent: &str,
    id: &str,
    pid: u32,
) -> Result<(), Error> {
    if settings.is_empty() {
        return Ok(());
    }
    let settings = settings
        .iter()
        .map(|s| parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mounts = mounts()?;
    if version == "2" {
        let (_, mount, _) = mounts
            .iter()
            .find(|(t, _, _)| t == "cgroup2")
            .ok_or_else(|| Error::Invalid("no cgroup v2 hierarchy is mounted".into()))?;
        let available = std::fs::read_to_string(mount.join("cgroup.controllers"))
            .map_err(sys(format!("read {}/cgroup.controllers", mount.display())))?;
        for s in &settings {
            if !available.split_whitespace().any(|c| c == s.controller) {
                return Err(Error::Invalid(format!(
                    "cgroup v2 at {} has no '{}' controller (it has: {})",
                    mount.display(),
                    s.controller,
                    available.trim()
                )));
            }
        }
        let dir = make_dir(mount, parent, id)?;
        // Each level above the jail's cgroup hands the controllers down.
        let mut level = mount.clone();
        for part in Path::new(parent.trim_matches('/')).components() {
            for s in &settings {
                write(
                    &level.join("cgroup.subtree_control"),
                    &format!("+{}", s.controller),
                )?;
            }
            level = level.join(part);
        }
        for s in &settings {
            write(
                &level.join("cgroup.subtree_control"),
                &format!("+{}", s.controller),
            )?;
        }
        for s in &settings {
            write(&dir.join(&s.file), &s.value)?;
        }
        return write(&dir.join("cgroup.procs"), &pid.to_string());
    }
    let mut joined: Vec<PathBuf> = Vec::new();
    for s in &settings {
        let (_, mount, _) = mounts
            .iter()
            .find(|(t, _, o)| t == "cgroup" && o.split(',').any(|w| w == s.controller))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "no cgroup v1 hierarchy has the '{}' controller (try --cgroup-version 2)",
                    s.controller
                ))
            })?;
        let dir = mount.join(parent.trim_matches('/')).join(id);
        if !joined.contains(&dir) {
            make_dir(mount, parent, id)?;
            if s.controller == "cpuset" {
                inherit_cpuset(mount, &dir)?;
            }
        }
        write(&dir.join(&s.file), &s.value)?;
        if !joined.contains(&dir) {
            joined.push(dir);
        }
    }
    for dir in &joined {
        write(&dir.join("tasks"), &pid.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_a_controller_file_and_a_value() {
        let s = parse("memory.limit_in_bytes=1048576").unwrap();
        assert_eq!(
            (s.controller.as_str(), s.file.as_str(), s.value.as_str()),
            ("memory", "memory.limit_in_bytes", "1048576")
        );
        for bad in [
            "memory",
            "nodot=1",
            "memory.max=",
            "../memory.max=1",
            ".max=1",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}

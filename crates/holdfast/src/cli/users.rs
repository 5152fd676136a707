//! `holdfast users` and `holdfast tokens`: console users (argon2id passwords, roles)
//! and API tokens for scripts (shown once).

use super::admin::{ServerArgs, print_json};
use anyhow::{Context, bail};
use clap::Subcommand;
use client::seg;
use protocol::{
    CreateToken, CreateUser, CreatedToken, ModifyUser, Role, SetPassword, TokenInfo, UserInfo,
};
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a console user. The password comes from --password-file (its first line),
    /// else is asked on the terminal (twice), else is read as one line of stdin.
    Create {
        name: String,
        #[arg(long)]
        role: Role,
        /// A file whose first line is the password.
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// List users: role, state, wrong passwords in a row, lockout.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Change a user's role.
    SetRole { name: String, role: Role },
    /// Disable a user: it cannot sign in, its sessions end, tokens it created stop.
    Disable { name: String },
    /// Enable a disabled user again.
    Enable { name: String },
    /// Set a new password for a user (ends its sessions and any lockout); read like
    /// `create`'s.
    ResetPassword {
        name: String,
        #[arg(long, value_name = "FILE")]
        password_file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create an API token for scripts; it is printed once and stored only hashed. Use
    /// it as a --token-file's content or as `Authorization: Bearer`.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        role: Role,
        /// Days until it stops working (default: never).
        #[arg(long, value_name = "DAYS")]
        expires: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// List API tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an API token by its id.
    Revoke { id: i64 },
}

/// The password: a file's first line, a terminal prompt without echo, or a stdin line.
fn password(file: Option<&Path>) -> anyhow::Result<String> {
    if let Some(f) = file {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        return Ok(text.lines().next().unwrap_or("").to_string());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let first = prompt("Password: ")?;
    let again = prompt("Password (again): ")?;
    if first != again {
        bail!("the two passwords differ");
    }
    Ok(first)
}

/// Reads one line from the terminal with echo off (restored even on error).
fn prompt(what: &str) -> anyhow::Result<String> {
    eprint!("{what}");
    std::io::stderr().flush().ok();
    let fd = libc::STDIN_FILENO;
    // SAFETY: termios is plain data, filled by tcgetattr before use.
    let mut old: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is stdin, a terminal (checked by the caller); `old` is a valid pointer.
    let echo_off = unsafe { libc::tcgetattr(fd, &mut old) } == 0;
    if echo_off {
        let mut quiet = old;
        quiet.c_lflag &= !libc::ECHO;
        // SAFETY: as above; `quiet` is a copy of the terminal's own settings.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if echo_off {
        // SAFETY: restores the settings read above.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &old) };
    }
    eprintln!();
    read.context("reading the password")?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn checked_password(file: Option<&Path>) -> anyhow::Result<String> {
    let pw = password(file)?;
    protocol::check_password(&pw).map_err(anyhow::Error::msg)?;
    Ok(pw)
}

fn show_user(u: &UserInfo) {
    let state = match (&u.locked_until, u.disabled) {
        (_, true) => "disabled".to_string(),
        (Some(t), false) => format!("locked until {t}"),
        (None, false) => "active".to_string(),
    };
    println!(
        "{:<24} {:<9} {:<30} {:<21} {}",
        u.name, u.role, state, u.created, u.failed_logins
    );
}

pub fn users(s: &ServerArgs, c: UsersCommand) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    let modify = |name: &str, m: ModifyUser| -> anyhow::Result<UserInfo> {
        Ok(cl.patch(&format!("/users/{}", seg(name)), &m)?)
    };
    match c {
        UsersCommand::Create {
            name,
            role,
            password_file,
            json,
        } => {
            protocol::check_user_name("name", &name).map_err(anyhow::Error::msg)?;
            let password = checked_password(password_file.as_deref())?;
            let u: UserInfo = cl.post(
                "/users",
                &CreateUser {
                    name,
                    role,
                    password,
                },
            )?;
            if json {
                print_json(&u)?;
            } else {
                println!("user {} created with role {}", u.name, u.role);
            }
        }
        UsersCommand::List { json } => {
            let list: Vec<UserInfo> = cl.get("/users")?;
            if json {
                print_json(&list)?;
            } else if list.is_empty() {
                println!("no users (create one: holdfast users create NAME --role admin)");
            } else {
                println!(
                    "{:<24} {:<9} {:<30} {:<21} WRONG PASSWORDS",
                    "NAME", "ROLE", "STATE", "CREATED"
                );
                list.iter().for_each(show_user);
            }
        }
        UsersCommand::SetRole { name, role } => {
            let u = modify(
                &name,
                ModifyUser {
                    role: Some(role),
                    disabled: None,
                },
            )?;
            println!("user {} now has role {}", u.name, u.role);
        }
        UsersCommand::Disable { name } => {
            let u = modify(
                &name,
                ModifyUser {
                    role: None,
                    disabled: Some(true),
                },
            )?;
            println!("user {} disabled", u.name);
        }
        UsersCommand::Enable { name } => {
            let u = modify(
                &name,
                ModifyUser {
                    role: None,
                    disabled: Some(false),
                },
            )?;
            println!("user {} enabled", u.name);
        }
        UsersCommand::ResetPassword {
            name,
            password_file,
        } => {
            let new = checked_password(password_file.as_deref())?;
            cl.post_ok(
                &format!("/users/{}/password", seg(&name)),
                &SetPassword { old: None, new },
            )?;
            println!("password of {name} set; its sessions ended");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn tokens(s: &ServerArgs, c: TokensCommand) -> anyhow::Result<ExitCode> {
    let cl = s.client()?;
    match c {
        TokensCommand::Create {
            name,
            role,
            expires,
            json,
        } => {
            let req = CreateToken {
                name,
                role,
                expires_days: expires,
            };
            req.validate().map_err(anyhow::Error::msg)?;
            let t: CreatedToken = cl.post("/tokens", &req)?;
            if json {
                print_json(&t)?;
            } else {
                println!("{}", t.token);
                eprintln!(
                    "API token {} (id {}, role {}{}): shown this once; store it now",
                    t.info.name,
                    t.info.id,
                    t.info.role,
                    t.info
                        .expires
                        .as_deref()
                        .map(|e| format!(", expires {e}"))
                        .unwrap_or_default()
                );
            }
        }
        TokensCommand::List { json } => {
            let list: Vec<TokenInfo> = cl.get("/tokens")?;
            if json {
                print_json(&list)?;
            } else if list.is_empty() {
                println!("no API tokens");
            } else {
                println!(
                    "{:<6} {:<24} {:<9} {:<21} {:<21} CREATED BY",
                    "ID", "NAME", "ROLE", "CREATED", "EXPIRES"
                );
                for t in list {
                    println!(
                        "{:<6} {:<24} {:<9} {:<21} {:<21} {}",
                        t.id,
                        t.name,
                        t.role,
                        t.created,
                        t.expires.as_deref().unwrap_or("never"),
                        t.created_by
                    );
                }
            }
        }
        TokensCommand::Revoke { id } => {
            let _: serde_json::Value = cl.delete(&format!("/tokens/{id}"))?;
            println!("API token {id} revoked");
        }
    }
    Ok(ExitCode::SUCCESS)
}

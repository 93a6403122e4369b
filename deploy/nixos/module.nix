# A NixOS module for converge: `services.converge`.
#
#   imports = [ ./deploy/nixos/module.nix ];
#   services.converge = {
#     enable = true;
#     package = pkgs.callPackage ./package.nix { };   # or your own build
#     git.url = "ssh://git@example.org/fleet.git";
#     git.branch = "main";
#     git.allowedSigners = ./allowed_signers;
#     directory = "hosts";                            # inside the repository
#     notify = [ "http://127.0.0.1:9000/hook" ];
#     notifySecretFile = "/run/secrets/converge-notify";
#   };
#
# Without git.url it watches `directory` as a local path kept up to date by
# something else. The service is hardened like deploy/converge.service.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.converge;
  inherit (lib) mkEnableOption mkOption mkIf types optionals concatMap escapeShellArgs;
  stateDir = "/var/lib/converge";
  args =
    [ "run" "--state" "${stateDir}/controller" "--log-format" "json" ]
    ++ (if cfg.git.url != null then
          [ "--git" cfg.git.url "--branch" cfg.git.branch "--poll" cfg.git.poll "--dir" cfg.directory ]
          ++ optionals (cfg.git.allowedSigners != null) [ "--allowed-signers" "${cfg.git.allowedSigners}" ]
        else
          [ "--dir" cfg.directory ])
    ++ concatMap (url: [ "--notify" url ]) cfg.notify
    ++ optionals (cfg.notifySecretFile != null) [ "--notify-secret-file" cfg.notifySecretFile ]
    ++ cfg.extraArgs;
in
{
  options.services.converge = {
    enable = mkEnableOption "converge, a reconciliation controller for machines, QEMU VMs and service roles";

    package = mkOption {
      type = types.package;
      description = "The converge package; its bin/converge is run.";
    };

    git = {
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "ssh://git@example.org/fleet.git";
        description = "The Git remote converge clones and follows (fast-forward only). Null: watch `directory` instead.";
      };
      branch = mkOption {
        type = types.str;
        default = "main";
        description = "The branch followed.";
      };
      poll = mkOption {
        type = types.str;
        default = "60s";
        description = "How often the remote is fetched.";
      };
      allowedSigners = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = "An ssh allowed_signers file: only commits whose SSH signature it accepts are applied.";
      };
    };

    directory = mkOption {
      type = types.str;
      default = ".";
      description = "The desired-state directory: relative to the repository root with git.url, else a path.";
    };

    notify = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "URLs that receive a signed JSON POST on each condition transition.";
    };

    notifySecretFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "A file holding the HMAC key of notifications (kept out of the Nix store).";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--keep-generations" "10" ];
      description = "More arguments for `converge run`.";
    };
  };

  config = mkIf cfg.enable {
    systemd.services.converge = {
      description = "converge: reconcile machines, VMs and service roles to desired state";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # nix: machines with `build: {nix: …}` build their systems with it.
      path = [ pkgs.openssh pkgs.git pkgs.qemu pkgs.coreutils config.nix.package ];
      environment.HOME = stateDir;
      serviceConfig = {
        Type = "exec";
        ExecStart = "${cfg.package}/bin/converge ${escapeShellArgs args}";
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        RestartSec = "5s";
        KillMode = "mixed";
        LimitNOFILE = 8192;
        DynamicUser = true;
        User = "converge";
        Group = "converge";
        SupplementaryGroups = [ "kvm" ];
        StateDirectory = "converge";
        StateDirectoryMode = "0700";
        UMask = "0077";
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        DeviceAllow = [ "/dev/kvm rw" "/dev/net/tun rw" ];
        DevicePolicy = "closed";
        ProtectProc = "invisible";
        ProcSubset = "pid";
        NoNewPrivileges = true;
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        RestrictSUIDSGID = true;
        LockPersonality = true;
        RestrictRealtime = true;
        RestrictNamespaces = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        RemoveIPC = true;
        KeyringMode = "private";
        MemoryDenyWriteExecute = false;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged @mount @obsolete @debug @cpu-emulation @clock @module @raw-io @reboot @swap" ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}

# A NixOS fleet for converge: one nixosConfigurations entry per Machine.
# converge builds `nixosConfigurations.<name>.config.system.build.toplevel`
# on the controller, copies its closure over SSH and switches to it.
{
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      host = name: extra: nixpkgs.lib.nixosSystem {
        system = "x86_64-linux";
        modules = [
          ./hardware/${name}.nix
          {
            networking.hostName = name;
            services.openssh.enable = true;
            users.users.root.openssh.authorizedKeys.keys = [
              # the controller's key (identityFile in machines/*.yaml)
              "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleExampleExampleExampleExampleExample converge"
            ];
            system.stateVersion = "24.11";
          }
          extra
        ];
      };
    in {
      nixosConfigurations = {
        web1 = host "web1" { services.nginx.enable = true; };
        db1 = host "db1" { services.postgresql.enable = true; };
      };
    };
}

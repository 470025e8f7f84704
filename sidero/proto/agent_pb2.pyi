# ruff: noqa
# mypy: ignore-errors
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StorageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    Unknown: _ClassVar[StorageType]
    SSD: _ClassVar[StorageType]
    HDD: _ClassVar[StorageType]
    NVMe: _ClassVar[StorageType]
    SD: _ClassVar[StorageType]
Unknown: StorageType
SSD: StorageType
HDD: StorageType
NVMe: StorageType
SD: StorageType

class BMCInfo(_message.Message):
    __slots__ = ("ip", "port", "user")
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PASS_FIELD_NUMBER: _ClassVar[int]
    ip: str
    port: int
    user: str
    def __init__(self, ip: _Optional[str] = ..., port: _Optional[int] = ..., user: _Optional[str] = ..., **kwargs) -> None: ...

class SystemInformation(_message.Message):
    __slots__ = ("uuid", "manufacturer", "product_name", "version", "serial_number", "sku_number", "family")
    UUID_FIELD_NUMBER: _ClassVar[int]
    MANUFACTURER_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SERIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    SKU_NUMBER_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    manufacturer: str
    product_name: str
    version: str
    serial_number: str
    sku_number: str
    family: str
    def __init__(self, uuid: _Optional[str] = ..., manufacturer: _Optional[str] = ..., product_name: _Optional[str] = ..., version: _Optional[str] = ..., serial_number: _Optional[str] = ..., sku_number: _Optional[str] = ..., family: _Optional[str] = ...) -> None: ...

class Processor(_message.Message):
    __slots__ = ("manufacturer", "product_name", "serial_number", "speed", "core_count", "thread_count")
    MANUFACTURER_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_NAME_FIELD_NUMBER: _ClassVar[int]
    SERIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    CORE_COUNT_FIELD_NUMBER: _ClassVar[int]
    THREAD_COUNT_FIELD_NUMBER: _ClassVar[int]
    manufacturer: str
    product_name: str
    serial_number: str
    speed: int
    core_count: int
    thread_count: int
    def __init__(self, manufacturer: _Optional[str] = ..., product_name: _Optional[str] = ..., serial_number: _Optional[str] = ..., speed: _Optional[int] = ..., core_count: _Optional[int] = ..., thread_count: _Optional[int] = ...) -> None: ...

class ComputeInformation(_message.Message):
    __slots__ = ("total_core_count", "total_thread_count", "processor_count", "processors")
    TOTAL_CORE_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_THREAD_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROCESSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    PROCESSORS_FIELD_NUMBER: _ClassVar[int]
    total_core_count: int
    total_thread_count: int
    processor_count: int
    processors: _containers.RepeatedCompositeFieldContainer[Processor]
    def __init__(self, total_core_count: _Optional[int] = ..., total_thread_count: _Optional[int] = ..., processor_count: _Optional[int] = ..., processors: _Optional[_Iterable[_Union[Processor, _Mapping]]] = ...) -> None: ...

class MemoryModule(_message.Message):
    __slots__ = ("manufacturer", "product_name", "serial_number", "type", "size", "speed")
    MANUFACTURER_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_NAME_FIELD_NUMBER: _ClassVar[int]
    SERIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SPEED_FIELD_NUMBER: _ClassVar[int]
    manufacturer: str
    product_name: str
    serial_number: str
    type: str
    size: int
    speed: int
    def __init__(self, manufacturer: _Optional[str] = ..., product_name: _Optional[str] = ..., serial_number: _Optional[str] = ..., type: _Optional[str] = ..., size: _Optional[int] = ..., speed: _Optional[int] = ...) -> None: ...

class MemoryInformation(_message.Message):
    __slots__ = ("total_size", "module_count", "modules")
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODULE_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    total_size: int
    module_count: int
    modules: _containers.RepeatedCompositeFieldContainer[MemoryModule]
    def __init__(self, total_size: _Optional[int] = ..., module_count: _Optional[int] = ..., modules: _Optional[_Iterable[_Union[MemoryModule, _Mapping]]] = ...) -> None: ...

class StorageDevice(_message.Message):
    __slots__ = ("type", "size", "model", "serial", "name", "device_name", "uuid", "wwid")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    WWID_FIELD_NUMBER: _ClassVar[int]
    type: StorageType
    size: int
    model: str
    serial: str
    name: str
    device_name: str
    uuid: str
    wwid: str
    def __init__(self, type: _Optional[_Union[StorageType, str]] = ..., size: _Optional[int] = ..., model: _Optional[str] = ..., serial: _Optional[str] = ..., name: _Optional[str] = ..., device_name: _Optional[str] = ..., uuid: _Optional[str] = ..., wwid: _Optional[str] = ...) -> None: ...

class StorageInformation(_message.Message):
    __slots__ = ("total_size", "device_count", "devices")
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    total_size: int
    device_count: int
    devices: _containers.RepeatedCompositeFieldContainer[StorageDevice]
    def __init__(self, total_size: _Optional[int] = ..., device_count: _Optional[int] = ..., devices: _Optional[_Iterable[_Union[StorageDevice, _Mapping]]] = ...) -> None: ...

class NetworkInterface(_message.Message):
    __slots__ = ("index", "name", "flags", "mtu", "mac", "addresses")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    MTU_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    flags: str
    mtu: int
    mac: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., flags: _Optional[str] = ..., mtu: _Optional[int] = ..., mac: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class NetworkInformation(_message.Message):
    __slots__ = ("interface_count", "interfaces")
    INTERFACE_COUNT_FIELD_NUMBER: _ClassVar[int]
    INTERFACES_FIELD_NUMBER: _ClassVar[int]
    interface_count: int
    interfaces: _containers.RepeatedCompositeFieldContainer[NetworkInterface]
    def __init__(self, interface_count: _Optional[int] = ..., interfaces: _Optional[_Iterable[_Union[NetworkInterface, _Mapping]]] = ...) -> None: ...

class HardwareInformation(_message.Message):
    __slots__ = ("system", "compute", "memory", "storage", "network")
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    system: SystemInformation
    compute: ComputeInformation
    memory: MemoryInformation
    storage: StorageInformation
    network: NetworkInformation
    def __init__(self, system: _Optional[_Union[SystemInformation, _Mapping]] = ..., compute: _Optional[_Union[ComputeInformation, _Mapping]] = ..., memory: _Optional[_Union[MemoryInformation, _Mapping]] = ..., storage: _Optional[_Union[StorageInformation, _Mapping]] = ..., network: _Optional[_Union[NetworkInformation, _Mapping]] = ...) -> None: ...

class CreateServerRequest(_message.Message):
    __slots__ = ("hardware", "hostname")
    HARDWARE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    hardware: HardwareInformation
    hostname: str
    def __init__(self, hardware: _Optional[_Union[HardwareInformation, _Mapping]] = ..., hostname: _Optional[str] = ...) -> None: ...

class CreateServerResponse(_message.Message):
    __slots__ = ("wipe", "insecure_wipe", "setup_bmc", "reboot_timeout")
    WIPE_FIELD_NUMBER: _ClassVar[int]
    INSECURE_WIPE_FIELD_NUMBER: _ClassVar[int]
    SETUP_BMC_FIELD_NUMBER: _ClassVar[int]
    REBOOT_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    wipe: bool
    insecure_wipe: bool
    setup_bmc: bool
    reboot_timeout: float
    def __init__(self, wipe: _Optional[bool] = ..., insecure_wipe: _Optional[bool] = ..., setup_bmc: _Optional[bool] = ..., reboot_timeout: _Optional[float] = ...) -> None: ...

class Address(_message.Message):
    __slots__ = ("type", "address")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    type: str
    address: str
    def __init__(self, type: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class MarkServerAsWipedRequest(_message.Message):
    __slots__ = ("uuid",)
    UUID_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    def __init__(self, uuid: _Optional[str] = ...) -> None: ...

class MarkServerAsWipedResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("uuid",)
    UUID_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    def __init__(self, uuid: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpdateBMCInfoRequest(_message.Message):
    __slots__ = ("uuid", "bmc_info")
    UUID_FIELD_NUMBER: _ClassVar[int]
    BMC_INFO_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    bmc_info: BMCInfo
    def __init__(self, uuid: _Optional[str] = ..., bmc_info: _Optional[_Union[BMCInfo, _Mapping]] = ...) -> None: ...

class UpdateBMCInfoResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReconcileServerAddressesRequest(_message.Message):
    __slots__ = ("uuid", "address")
    UUID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    address: _containers.RepeatedCompositeFieldContainer[Address]
    def __init__(self, uuid: _Optional[str] = ..., address: _Optional[_Iterable[_Union[Address, _Mapping]]] = ...) -> None: ...

class ReconcileServerAddressesResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

"""Twenty output types of the shapes programs ask for (nested objects, arrays, enums, numbers with bounds, optional
and required fields), each with a prompt: what `chat.completions.parse` is tried with. Strings and lists are bounded,
as a program that wants a reply in time bounds them."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field

Short = Field(max_length=24)


class Color(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class City(BaseModel):
    name: str = Short
    country: str = Short


class Weather(BaseModel):
    city: str = Short
    celsius: float = Field(ge=-90, le=60)
    sky: Literal["sunny", "cloudy", "rainy"]


class Person(BaseModel):
    name: str = Short
    age: int = Field(ge=0, le=130)


class Address(BaseModel):
    street: str = Short
    city: City


class Employee(BaseModel):
    person: Person
    address: Address
    salary: int = Field(ge=0)


class Recipe(BaseModel):
    title: str = Short
    ingredients: list[str] = Field(min_length=1, max_length=4)
    minutes: int = Field(ge=1, le=600)


class Vote(BaseModel):
    answer: Literal["yes", "no"]
    confidence: float = Field(ge=0, le=1)


class Palette(BaseModel):
    colors: list[Color] = Field(min_length=1, max_length=3)


class Book(BaseModel):
    title: str = Short
    author: Person
    year: int = Field(ge=1400, le=2100)
    genre: Literal["fiction", "science", "history"]


class Point(BaseModel):
    x: float
    y: float


class Polygon(BaseModel):
    name: str = Short
    points: list[Point] = Field(min_length=3, max_length=4)


class Todo(BaseModel):
    task: str = Short
    done: bool
    priority: int = Field(ge=1, le=5)


class TodoList(BaseModel):
    items: list[Todo] = Field(min_length=1, max_length=3)


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    score: float = Field(ge=-1, le=1)


class Product(BaseModel):
    name: str = Short
    price: float = Field(gt=0, le=100000)
    tags: list[str] = Field(max_length=3)
    in_stock: bool


class Event(BaseModel):
    title: str = Short
    day: int = Field(ge=1, le=31)
    month: int = Field(ge=1, le=12)
    attendees: list[Person] = Field(max_length=2)


class Translation(BaseModel):
    source: str = Short
    target: str = Short
    language: Literal["fr", "de", "es"]


class Team(BaseModel):
    name: str = Short
    lead: Person
    members: list[Person] = Field(max_length=2)


class Measurement(BaseModel):
    unit: Literal["m", "kg", "s"]
    value: float
    error: float | None = None


class Planet(BaseModel):
    name: str = Short
    moons: int = Field(ge=0, le=200)
    rings: bool
    color: Color


class Movie(BaseModel):
    title: str = Short
    rating: float = Field(ge=0, le=10)
    cast: list[str] = Field(min_length=1, max_length=3)
    sequel: bool


class Inventory(BaseModel):
    warehouse: City
    products: list[Product] = Field(max_length=2)


CASES: list[tuple[type[BaseModel], str]] = [
    (City, "Name a city and its country."),
    (Weather, "Describe the weather in Paris today."),
    (Person, "Invent a person."),
    (Employee, "Describe an employee of a bakery."),
    (Recipe, "Give me a pancake recipe."),
    (Vote, "Is water wet?"),
    (Palette, "Pick colors for a flag."),
    (Book, "Tell me about a famous novel."),
    (Polygon, "Describe a triangle."),
    (TodoList, "Plan my Monday."),
    (Sentiment, "How does 'I love this film' feel?"),
    (Product, "Describe a laptop for sale."),
    (Event, "Plan a birthday party."),
    (Translation, "Translate 'hello' into French."),
    (Team, "Describe a small football team."),
    (Measurement, "How tall is a door?"),
    (Planet, "Describe Saturn."),
    (Movie, "Tell me about a science fiction film."),
    (Inventory, "Describe a shop's stock."),
    (Weather, "Describe the weather in Oslo in winter."),
]
